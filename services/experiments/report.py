"""Per-arm results of an experiment: outcome rates with intervals, suggestion acceptance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

from sqlalchemy.orm import Session

from services.experiments import repository
from services.experiments.service import get_experiment


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at small n and near 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(
    successes_a: int, n_a: int, successes_b: int, n_b: int
) -> tuple[float, float]:
    """95% interval of p_a - p_b by Newcombe's hybrid score method (his method 10: sound at
    small n, unlike the Wald interval), from each arm's Wilson interval."""
    p_a = successes_a / n_a if n_a else 0.0
    p_b = successes_b / n_b if n_b else 0.0
    (low_a, high_a), (low_b, high_b) = (
        wilson_interval(successes_a, n_a),
        wilson_interval(successes_b, n_b),
    )
    d = p_a - p_b
    return (
        d - math.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2),
        d + math.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2),
    )


def minimum_detectable_effect(
    base_rate: float, n_control: int, n_treatment: int, alpha: float = 0.05, power: float = 0.8
) -> float | None:
    """The smallest lift over base_rate that a two-sided z-test at alpha detects with the given
    power at these arm sizes (unpooled normal approximation); None when no lift up to 1 - base
    rate is detectable or an arm is empty."""
    if n_control <= 0 or n_treatment <= 0:
        return None
    normal = NormalDist()
    z_alpha, z_power = normal.inv_cdf(1 - alpha / 2), normal.inv_cdf(power)

    def shortfall(lift: float) -> float:
        treated = base_rate + lift
        se = math.sqrt(
            base_rate * (1 - base_rate) / n_control + treated * (1 - treated) / n_treatment
        )
        return lift - (z_alpha + z_power) * se

    low, high = 0.0, 1.0 - base_rate
    if shortfall(high) < 0:
        return None
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if shortfall(middle) < 0 else (low, middle)
    return high


def sample_size_per_arm(
    base_rate: float, lift: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Conversations per arm for a two-sided z-test at alpha to detect base_rate -> base_rate
    + lift with the given power (unpooled normal approximation, the one
    `minimum_detectable_effect` inverts)."""
    treated = base_rate + lift
    if not 0 < base_rate < 1 or not 0 < treated < 1 or lift == 0:
        raise ValueError("base_rate and base_rate + lift must lie in (0, 1), lift non-zero")
    normal = NormalDist()
    z = normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)
    variance = base_rate * (1 - base_rate) + treated * (1 - treated)
    return math.ceil(z * z * variance / (lift * lift))


def mcnemar_exact_p(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar test: under no difference each discordant pair (an outcome under
    one policy only) is the second's with probability 1/2; twice the smaller binomial tail,
    capped at 1."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail: float = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_difference_interval(
    both: int, only_first: int, only_second: int, neither: int, z: float = 1.959964
) -> tuple[float, float]:
    """95% interval of rate(second) - rate(first) over the same units (paired binary outcomes):
    the Wald interval after adding 1/2 to each of the four cells (Agresti & Min 2005), which
    keeps its coverage near nominal at small n and with no discordant pairs."""
    n = both + only_first + only_second + neither + 2
    b, c = only_first + 0.5, only_second + 0.5
    difference = (c - b) / n
    se = math.sqrt(((b + c) - (c - b) ** 2 / n) / (n * n))
    return max(-1.0, difference - z * se), min(1.0, difference + z * se)


@dataclass
class ArmResult:
    arm: str
    policy: str
    conversations: int
    ended: int
    outcomes: int
    relations: dict[str, int] = field(default_factory=dict)

    @property
    def outcome_rate(self) -> float:
        return self.outcomes / self.ended if self.ended else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.outcomes, self.ended)

    def relation_rate(self, relation: str) -> float:
        total = sum(self.relations.values())
        return self.relations.get(relation, 0) / total if total else 0.0


def experiment_results(session: Session, *, experiment_id: str) -> list[ArmResult]:
    """Outcome rates over ended conversations of each arm, and how replies used suggestions."""
    get_experiment(session, experiment_id=experiment_id)
    results = {
        str(row["arm"]): ArmResult(
            arm=str(row["arm"]),
            policy=str(row["policy"]),
            conversations=int(row["conversations"]),  # type: ignore[call-overload]
            ended=int(row["ended"]),  # type: ignore[call-overload]
            outcomes=int(row["outcomes"]),  # type: ignore[call-overload]
        )
        for row in repository.arm_outcomes(session, experiment_id=experiment_id)
    }
    for arm, relation, count in repository.arm_reply_relations(
        session, experiment_id=experiment_id
    ):
        results[arm].relations[relation] = count
    return list(results.values())
