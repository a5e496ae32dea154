"""The paired simulator comparison: the same customers under two policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.generation.base import (
    AdapterRef,
    BackendUnavailable,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from services.simulator.paired import ServedPolicy, compare_paired
from services.simulator.runner import simulate_offline
from services.simulator.scenarios import SCENARIOS
from tests.simulator.test_simulator import bad_policy, good_policy

RENOVATION = SCENARIOS["renovation"]


def abstain(conversation: list[Any]) -> str | None:
    return None


def also_abstain(conversation: list[Any]) -> str | None:
    return None


def test_the_same_policy_twice_agrees_on_every_customer() -> None:
    """Customers are replayed: two copies of one deterministic policy convert exactly the same
    customers (with different customers the outcomes would disagree about as often as
    2 p (1 - p) of them)."""
    pc = compare_paired(RENOVATION, (("a", abstain), ("b", also_abstain)), n=60, seed=5)
    both, only_first, only_second, neither = pc.cells
    assert only_first == only_second == 0 and both + neither == 60
    assert 0 < both < 60  # some customers convert with the rep alone, some do not
    assert pc.difference == 0 and pc.p_value == 1.0
    # and played concurrently, the same records
    again = simulate_offline(RENOVATION, 60, 5, abstain, concurrency=8)
    assert tuple(r.outcome for r in again.records) == pc.first_outcomes


def test_a_better_policy_wins_on_the_same_customers() -> None:
    pc = compare_paired(
        RENOVATION, (("bad", bad_policy), ("good", good_policy(RENOVATION))), n=80, seed=1
    )
    low, _ = pc.interval
    assert pc.difference > 0.15 and low > 0 and pc.p_value < 0.01, pc.cells
    assert pc.rate("second")[0] - pc.rate("first")[0] == pytest.approx(pc.difference)


class FailingBackend:
    name = "failing"
    max_context_tokens = 512

    def count_tokens(self, messages: list[Any]) -> int:
        return 10

    def generate(self, request: GenerationRequest, *, timeout: float) -> GenerationResult:
        raise BackendUnavailable("no replica can serve")


def test_a_failing_backend_counts_as_abstentions() -> None:
    served = ServedPolicy(
        FailingBackend(),  # type: ignore[arg-type]
        AdapterRef("p", "/nowhere"),
        "You are a business.",
        SamplingParams(max_new_tokens=8),
    )
    pc = compare_paired(RENOVATION, (("rep alone", abstain), ("failing", served)), n=12, seed=2)
    assert pc.backend_errors == {"rep alone": 0, "failing": served.errors}
    assert served.errors > 0 and served.suggestions == 0
    assert pc.first_outcomes == pc.second_outcomes  # a failure is an abstention


def test_a_served_policy_answers_through_the_real_backend(
    tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    from services.generation.embedded import EmbeddedBackend

    backend = EmbeddedBackend(tiny_model, device="cpu", dtype="float32")
    try:
        served = ServedPolicy(
            backend,
            AdapterRef("pi0", str(tiny_adapters["zero"])),
            "You are a business.",
            SamplingParams(max_new_tokens=6, temperature=0.8, seed=3),
        )
        report = simulate_offline(RENOVATION, 3, 0, served, concurrency=3)
        assert served.errors == 0 and served.suggestions >= 3
        assert any(r.suggestion_scores for r in report.records)  # suggestions were shown
    finally:
        backend.close()
