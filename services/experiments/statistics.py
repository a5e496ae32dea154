"""The statistics of an A/B test on a binary outcome, treatment against control: pure functions
over counts, each named by the method it implements (the results API reports those names).

- each arm's outcome rate with a Wilson interval, the difference of two with Newcombe's hybrid
  score interval, the minimum detectable effect and the sample size of a two-sided z-test;
- a two-sided test of no difference: Boschloo's exact unconditional test while an arm is small
  (below `EXACT_BELOW` ended conversations), the two-proportion score test above;
- a sample-ratio-mismatch test of the arms' sizes against their configured weights (Pearson's
  chi-square goodness of fit);
- an always-valid interval of the difference that stays valid however often it is looked at:
  the asymptotic confidence sequence of Waudby-Smith et al. (2023, "Time-uniform central limit
  theory and asymptotic confidence sequences", Theorem 2.2), tuned as GrowthBook tunes it (the
  tightest at `SEQUENTIAL_TUNING_N` conversations in all);
- the posterior probability that treatment's rate beats control's under independent uniform
  priors (exact, by Evan Miller's closed form);
- for paired outcomes (the same simulated customers under two policies): the exact McNemar test
  and the Agresti-Min interval.

scipy computes what it already computes (the chi-square and normal tails, Boschloo's test, log-
beta); scipy is a base dependency because the API serves these numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

EXACT_BELOW = 50  # ended conversations in the smaller arm below which the exact test is used
SEQUENTIAL_TUNING_N = 5000  # GrowthBook's default: the confidence sequence is tightest here
SRM_ALPHA = 0.001  # a sample-ratio mismatch is flagged below this p-value


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


@dataclass(frozen=True)
class TestResult:
    method: str
    p_value: float


def score_test(successes_t: int, n_t: int, successes_c: int, n_c: int) -> TestResult:
    """Two-sided two-proportion score test (pooled variance; Pearson's chi-square on the 2 x 2
    table without continuity correction)."""
    from scipy.stats import norm  # type: ignore[import-untyped]

    if not n_t or not n_c:
        return TestResult("two-proportion score test", 1.0)
    pooled = (successes_t + successes_c) / (n_t + n_c)
    variance = pooled * (1 - pooled) * (1 / n_t + 1 / n_c)
    if variance == 0:
        return TestResult("two-proportion score test", 1.0)
    z = (successes_t / n_t - successes_c / n_c) / math.sqrt(variance)
    return TestResult("two-proportion score test", float(2 * norm.sf(abs(z))))


def boschloo_test(successes_t: int, n_t: int, successes_c: int, n_c: int) -> TestResult:
    """Two-sided Boschloo exact unconditional test (scipy): Fisher's p-value as the statistic,
    its tail maximised over the common rate under no difference; more powerful than Fisher's."""
    from scipy.stats import boschloo_exact

    if not n_t or not n_c:
        return TestResult("Boschloo exact test", 1.0)
    table = [[successes_t, successes_c], [n_t - successes_t, n_c - successes_c]]
    p = float(boschloo_exact(table, alternative="two-sided").pvalue)
    return TestResult("Boschloo exact test", min(1.0, p) if math.isfinite(p) else 1.0)


def difference_test(successes_t: int, n_t: int, successes_c: int, n_c: int) -> TestResult:
    """The exact test while the smaller arm has fewer than EXACT_BELOW ended conversations, the
    score test above."""
    if min(n_t, n_c) < EXACT_BELOW:
        return boschloo_test(successes_t, n_t, successes_c, n_c)
    return score_test(successes_t, n_t, successes_c, n_c)


def sample_ratio_mismatch(counts: Sequence[int], weights: Sequence[float]) -> TestResult:
    """Pearson's chi-square goodness of fit of the arms' units to their configured weights; a
    p-value below SRM_ALPHA means assignment or logging is broken, not that an arm is better."""
    if len(counts) != len(weights) or len(counts) < 2:
        raise ValueError("one count and one weight per arm, at least two arms")
    total, weight_sum = sum(counts), float(sum(weights))
    if total == 0 or weight_sum <= 0:
        return TestResult("chi-square goodness of fit", 1.0)
    return sample_ratio_mismatch_expected(counts, [total * w / weight_sum for w in weights])


def sample_ratio_mismatch_expected(counts: Sequence[int], expected: Sequence[float]) -> TestResult:
    """The same test against expected counts (e.g. summed over periods of different weights);
    units in an arm expected to get none are a mismatch outright."""
    from scipy.stats import chisquare

    if len(counts) != len(expected) or len(counts) < 2:
        raise ValueError("one count and one expected count per arm, at least two arms")
    if any(c > 0 for c, e in zip(counts, expected, strict=True) if e <= 0):
        return TestResult("chi-square goodness of fit", 0.0)
    live = [(c, e) for c, e in zip(counts, expected, strict=True) if e > 0]
    if len(live) < 2 or sum(c for c, _ in live) == 0:
        return TestResult("chi-square goodness of fit", 1.0)
    scale = sum(c for c, _ in live) / sum(e for _, e in live)  # same total, as chisquare needs
    p = chisquare([c for c, _ in live], [e * scale for _, e in live]).pvalue
    return TestResult("chi-square goodness of fit", float(p))


def sequential_rho(alpha: float, tuning_n: int = SEQUENTIAL_TUNING_N) -> float:
    """The tuning parameter that makes the confidence sequence tightest at tuning_n."""
    return math.sqrt((-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / tuning_n)


def sequential_interval(
    successes_t: int,
    n_t: int,
    successes_c: int,
    n_c: int,
    alpha: float = 0.05,
    tuning_n: int = SEQUENTIAL_TUNING_N,
) -> tuple[float, float]:
    """Always-valid (1 - alpha) interval of rate_t - rate_c (asymptotic confidence sequence):

        d +- sigma * sqrt(2 (N rho^2 + 1) / (N^2 rho^2) * log(sqrt(N rho^2 + 1) / alpha))

    with N = n_t + n_c and sigma^2 = N * Var(d) (each arm's Bernoulli variance over its size),
    as GrowthBook applies the theorem to a difference of means. Covers the true difference at
    every look at once with probability about 1 - alpha, so operators may look every day."""
    if not n_t or not n_c:
        return -1.0, 1.0
    p_t, p_c = successes_t / n_t, successes_c / n_c
    return sequential_interval_means(
        p_t, p_t * (1 - p_t), n_t, p_c, p_c * (1 - p_c), n_c, alpha, tuning_n
    )


def sequential_interval_means(
    mean_t: float,
    variance_t: float,
    n_t: int,
    mean_c: float,
    variance_c: float,
    n_c: int,
    alpha: float = 0.05,
    tuning_n: int = SEQUENTIAL_TUNING_N,
) -> tuple[float, float]:
    """The same always-valid interval for a difference of means of per-unit values in [0, 1]
    (e.g. each conversation's share of accepted suggestions), from each arm's mean, variance
    and number of units."""
    if not n_t or not n_c:
        return -1.0, 1.0
    n = n_t + n_c
    variance = variance_t / n_t + variance_c / n_c
    if variance == 0:  # no spread yet (all 0 or all 1): a plug-in floor, the largest in [0, 1]
        variance = 0.25 * (1 / n_t + 1 / n_c)
    sigma = math.sqrt(n * variance)
    rho2 = sequential_rho(alpha, tuning_n) ** 2
    half = sigma * math.sqrt(
        2 * (n * rho2 + 1) / (n * n * rho2) * math.log(math.sqrt(n * rho2 + 1) / alpha)
    )
    d = mean_t - mean_c
    return max(-1.0, d - half), min(1.0, d + half)


def probability_better(successes_t: int, n_t: int, successes_c: int, n_c: int) -> float:
    """P(rate_t > rate_c) with independent Beta(1 + successes, 1 + failures) posteriors:

    sum_{i < a_t} exp(lnB(a_c + i, b_c + b_t) - ln(b_t + i) - lnB(1 + i, b_t) - lnB(a_c, b_c))
    """
    from scipy.special import betaln  # type: ignore[import-untyped]

    a_t, b_t = 1 + successes_t, 1 + n_t - successes_t
    a_c, b_c = 1 + successes_c, 1 + n_c - successes_c
    total = math.fsum(
        math.exp(
            float(betaln(a_c + i, b_c + b_t))
            - math.log(b_t + i)
            - float(betaln(1 + i, b_t))
            - float(betaln(a_c, b_c))
        )
        for i in range(a_t)
    )
    return min(1.0, max(0.0, total))
