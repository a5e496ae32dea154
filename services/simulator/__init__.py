"""A conversation simulator: scenarios, simulated customers and reps, a client of the API.

`runner.run_conversations` drives the real HTTP API; `runner.simulate_offline` plays the same
dynamics against a Python policy. Scenarios live in `scenarios.SCENARIOS`.
"""
