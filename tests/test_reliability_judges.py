"""The vLLM-kill fault's verdict (tests/reliability/load.py) can fail: each expectation is
checked against a log that breaks it."""

from __future__ import annotations

import argparse

from tests.reliability.load import judge_vllm_kill, phase_summary

EVENTS = {"killed": 100.0, "restarting": 120.0, "healthy": 150.0}


def args(mode: str = "error") -> argparse.Namespace:
    return argparse.Namespace(on_backend_error=mode, fail_fast_seconds=5.0, recover_seconds=30.0)


def healthy_run(dead: tuple[str, bool] = ("503", False)) -> list[tuple[float, float, str, bool]]:
    """(started, seconds, status, carried text): served, dead for a while, served again."""
    return [
        (90.0, 2.0, "201", True),
        (105.0, 0.1, *dead),
        (115.0, 0.2, *dead),
        (151.0, 3.0, "201", True),
    ]


def test_a_run_that_fails_fast_and_recovers_passes() -> None:
    assert judge_vllm_kill(args(), healthy_run(), EVENTS) == {}
    assert judge_vllm_kill(args("abstain"), healthy_run(("201", False)), EVENTS) == {}


def test_each_broken_expectation_is_reported() -> None:
    # abstentions where 503s were asked for, and the other way round
    assert judge_vllm_kill(args(), healthy_run(("201", False)), EVENTS)
    assert judge_vllm_kill(args("abstain"), healthy_run(), EVENTS)
    # a 500 while dead
    assert "answers other than 503 while dead" in judge_vllm_kill(
        args(), healthy_run(("500", False)), EVENTS
    )
    # slow while dead
    slow = healthy_run()
    slow[1] = (105.0, 9.0, "503", False)
    assert any("slower" in k for k in judge_vllm_kill(args(), slow, EVENTS))
    # never served again, or only after the recovery bound
    assert "no suggestion served after the restart" in judge_vllm_kill(
        args(), healthy_run()[:-1], EVENTS
    )
    late = healthy_run()
    late[-1] = (185.0, 1.0, "201", True)
    assert any("recovery" in k for k in judge_vllm_kill(args(), late, EVENTS))
    # nothing asked while it was dead: the fault was not exercised
    assert "no suggestion asked while vLLM was dead" in judge_vllm_kill(
        args(), [healthy_run()[0], healthy_run()[-1]], EVENTS
    )


def test_phase_summary_counts_abstentions_apart() -> None:
    summary = phase_summary([(0.0, 1.0, "201", True), (0.0, 3.0, "201", False)])
    assert "'201': 1" in summary and "'201 abstained': 1" in summary
    assert "max 3.00 s" in summary
    assert phase_summary([]) == "none"
