"""Celery workers and the learning code they run (returns, Q fit, policy improvement).

Nothing here may import FastAPI; the API process may not import torch from here at module level.
"""
