"""Two policies on the same simulated customers: a paired comparison, for the simulator only.

Customer i of a seed is the same person under either policy (its persona and its random draws
come from (seed, i); services/simulator/runner.py), so the outcome of policy B on customer i is
compared with that of policy A on customer i. Pairs that agree carry no information about the
difference; the exact McNemar test and the paired interval use the discordant ones. Where the
two policies' outcomes are positively correlated this needs far fewer conversations than an
A/B test, which compares different customers. It is a simulator-only evaluation: real
customers cannot be replayed, so in production only the A/B test measures a policy.

The policies answer as served: the business's system prompt, the API's prompt builder, the
serving backend and sampling, and the API's parsing of abstentions. A backend failure is an
abstention and is counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from services.experiments.statistics import (
    mcnemar_exact_p,
    paired_difference_interval,
    wilson_interval,
)
from services.generation.base import (
    AdapterRef,
    BackendError,
    GenerationBackend,
    GenerationRequest,
    SamplingParams,
)
from services.policies.prompt import Turn, build_prompt, parse_completion
from services.simulator.features import Turn as SimTurn
from services.simulator.runner import Policy, simulate_offline
from services.simulator.scenarios import Scenario


@dataclass
class ServedPolicy:
    """A policy as the API serves it, as a simulator `Policy`."""

    backend: GenerationBackend
    adapter: AdapterRef
    system: str
    sampling: SamplingParams
    timeout_s: float = 120.0
    errors: int = 0
    suggestions: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, history: list[SimTurn]) -> str | None:
        try:
            prompt = build_prompt(
                [Turn(role, text) for role, text in history],
                system=self.system,
                count_tokens=self.backend.count_tokens,
                max_prompt_tokens=self.backend.max_context_tokens - self.sampling.max_new_tokens,
            )
            result = self.backend.generate(
                GenerationRequest(prompt.messages, self.adapter, self.sampling),
                timeout=self.timeout_s,
            )
        except BackendError:
            with self._lock:
                self.errors += 1
            return None
        with self._lock:
            self.suggestions += 1
        return parse_completion(result.completions[0].text)


@dataclass(frozen=True)
class PairedComparison:
    """Outcomes of policies `first` and `second` on the same n customers."""

    scenario: str
    seed: int
    first: str
    second: str
    first_outcomes: tuple[bool, ...]
    second_outcomes: tuple[bool, ...]
    backend_errors: dict[str, int]
    seconds: float

    @property
    def n(self) -> int:
        return len(self.first_outcomes)

    def _count(self, a: bool, b: bool) -> int:
        pairs = zip(self.first_outcomes, self.second_outcomes, strict=True)
        return sum(1 for x, y in pairs if x is a and y is b)

    @property
    def cells(self) -> tuple[int, int, int, int]:
        """(both, first only, second only, neither)."""
        return (
            self._count(True, True),
            self._count(True, False),
            self._count(False, True),
            self._count(False, False),
        )

    def rate(self, which: str) -> tuple[float, float, float]:
        """(rate, Wilson 95% low, high) of `first` or `second`."""
        outcomes = self.first_outcomes if which == "first" else self.second_outcomes
        k = sum(outcomes)
        low, high = wilson_interval(k, self.n)
        return (k / self.n if self.n else 0.0, low, high)

    @property
    def difference(self) -> float:
        """rate(second) - rate(first)."""
        _, only_first, only_second, _ = self.cells
        return (only_second - only_first) / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return paired_difference_interval(*self.cells)

    @property
    def p_value(self) -> float:
        _, only_first, only_second, _ = self.cells
        return mcnemar_exact_p(only_first, only_second)


def compare_paired(
    scenario: Scenario,
    policies: tuple[tuple[str, Policy], tuple[str, Policy]],
    *,
    n: int,
    seed: int,
    concurrency: int = 8,
    clock: Callable[[], float] | None = None,
) -> PairedComparison:
    """Play the same n customers (seed) under each of two named policies, one after the other."""
    import time

    now = clock or time.monotonic
    started = now()
    (first, first_policy), (second, second_policy) = policies
    reports = [
        simulate_offline(scenario, n, seed, policy, concurrency=concurrency)
        for policy in (first_policy, second_policy)
    ]
    errors = {
        name: int(getattr(policy, "errors", 0))
        for name, policy in ((first, first_policy), (second, second_policy))
    }
    return PairedComparison(
        scenario=scenario.name,
        seed=seed,
        first=first,
        second=second,
        first_outcomes=tuple(r.outcome for r in reports[0].records),
        second_outcomes=tuple(r.outcome for r in reports[1].records),
        backend_errors=errors,
        seconds=now() - started,
    )
