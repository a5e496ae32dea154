"""The A/B statistics against slow versions written from their definitions, and the
sequential interval's error rate under daily peeking, by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.experiments.statistics import (
    boschloo_test,
    difference_test,
    probability_better,
    sample_ratio_mismatch,
    score_test,
    sequential_interval,
)


def chi_square_1df_p(statistic: float) -> float:
    return math.erfc(math.sqrt(statistic / 2))


@pytest.mark.parametrize(("x_t", "n_t", "x_c", "n_c"), [(30, 200, 20, 200), (5, 60, 14, 70)])
def test_score_test_is_pearsons_chi_square_by_hand(x_t: int, n_t: int, x_c: int, n_c: int) -> None:
    observed = [[x_t, x_c], [n_t - x_t, n_c - x_c]]
    total = n_t + n_c
    rows = [x_t + x_c, total - x_t - x_c]
    columns = [n_t, n_c]
    statistic = sum(
        (observed[i][j] - rows[i] * columns[j] / total) ** 2 / (rows[i] * columns[j] / total)
        for i in range(2)
        for j in range(2)
    )
    result = score_test(x_t, n_t, x_c, n_c)
    assert result.p_value == pytest.approx(chi_square_1df_p(statistic), rel=1e-9)
    assert result.method == "two-proportion score test"


def boschloo_by_definition(x_t: int, n_t: int, x_c: int, n_c: int) -> float:
    """Each one-sided test: Fisher's one-sided p-value as the statistic, P(statistic <= the
    observed one) maximised over the common rate (a fine grid); two-sided: twice the smaller,
    at most 1 (the convention scipy documents)."""

    def fisher_one_sided(a: int, b: int, treatment_higher: bool) -> float:
        successes = a + b
        low, high = max(0, successes - n_c), min(successes, n_t)
        weights = {
            k: math.comb(n_t, k) * math.comb(n_c, successes - k) for k in range(low, high + 1)
        }
        tail = [k for k in weights if (k >= a if treatment_higher else k <= a)]
        return sum(weights[k] for k in tail) / sum(weights.values())

    def one_sided(treatment_higher: bool) -> float:
        observed = fisher_one_sided(x_t, x_c, treatment_higher)
        extreme = [
            (a, b)
            for a in range(n_t + 1)
            for b in range(n_c + 1)
            if fisher_one_sided(a, b, treatment_higher) <= observed * (1 + 1e-9)
        ]
        return max(
            sum(
                math.comb(n_t, a)
                * math.comb(n_c, b)
                * rate ** (a + b)
                * (1 - rate) ** (n_t + n_c - a - b)
                for a, b in extreme
            )
            for rate in np.linspace(0.0005, 0.9995, 2000)
        )

    return min(1.0, 2 * min(one_sided(True), one_sided(False)))


@pytest.mark.parametrize(("x_t", "n_t", "x_c", "n_c"), [(7, 9, 2, 8), (1, 10, 4, 9), (3, 6, 3, 7)])
def test_boschloo_matches_its_definition(x_t: int, n_t: int, x_c: int, n_c: int) -> None:
    expected = boschloo_by_definition(x_t, n_t, x_c, n_c)
    result = boschloo_test(x_t, n_t, x_c, n_c)
    assert result.p_value == pytest.approx(min(1.0, expected), abs=2e-3)


def test_the_exact_test_below_fifty_per_arm_the_score_test_above() -> None:
    assert difference_test(10, 49, 5, 200).method == "Boschloo exact test"
    assert difference_test(10, 50, 5, 50).method == "two-proportion score test"


def test_sample_ratio_mismatch_by_hand() -> None:
    counts, weights = [540, 460], [1, 1]
    statistic = sum((c - 500) ** 2 / 500 for c in counts)
    result = sample_ratio_mismatch(counts, weights)
    assert result.p_value == pytest.approx(chi_square_1df_p(statistic), rel=1e-9)
    assert result.p_value < 0.02
    # 90/10 weights: 905 / 95 is no mismatch; 800 / 200 is.
    assert sample_ratio_mismatch([905, 95], [0.9, 0.1]).p_value > 0.5
    assert sample_ratio_mismatch([800, 200], [0.9, 0.1]).p_value < 1e-10
    assert sample_ratio_mismatch([10, 1], [1, 0]).p_value == 0.0  # an arm weighted 0 got units
    with pytest.raises(ValueError, match="one count and one weight"):
        sample_ratio_mismatch([1, 2], [1])


@pytest.mark.parametrize(("x_t", "n_t", "x_c", "n_c"), [(60, 300, 45, 300), (3, 10, 5, 12)])
def test_probability_better_matches_monte_carlo(x_t: int, n_t: int, x_c: int, n_c: int) -> None:
    rng = np.random.default_rng(0)
    draws = 400_000
    treatment = rng.beta(1 + x_t, 1 + n_t - x_t, draws)
    control = rng.beta(1 + x_c, 1 + n_c - x_c, draws)
    monte_carlo = float((treatment > control).mean())
    assert probability_better(x_t, n_t, x_c, n_c) == pytest.approx(monte_carlo, abs=0.004)
    assert probability_better(5, 10, 5, 10) == pytest.approx(0.5, abs=1e-9)


def _daily_peeks(rate_t: float, rate_c: float, experiments: int, seed: int) -> dict[str, float]:
    """Each experiment: 30 days of 20 conversations per arm; every day an operator looks at the
    sequential interval and at a fixed-horizon score test. Share of experiments in which either
    ever excludes no difference, and in which the sequential one does at the last day."""
    days, per_day = 30, 20
    rng = np.random.default_rng(seed)
    s_t = rng.binomial(per_day, rate_t, (experiments, days)).cumsum(axis=1)
    s_c = rng.binomial(per_day, rate_c, (experiments, days)).cumsum(axis=1)
    sequential_ever = naive_ever = 0
    for e in range(experiments):
        seq = naive = False
        for d in range(days):
            n = per_day * (d + 1)
            low, high = sequential_interval(int(s_t[e, d]), n, int(s_c[e, d]), n)
            seq = seq or not low <= 0 <= high
            naive = naive or score_test(int(s_t[e, d]), n, int(s_c[e, d]), n).p_value < 0.05
        sequential_ever += seq
        naive_ever += naive
    return {"sequential": sequential_ever / experiments, "naive": naive_ever / experiments}


def _upper_bound(hits: float, n: int) -> float:
    """One-sided 95% Clopper-Pearson lower bound of a rate, for 'significantly above'."""
    from scipy.stats import beta  # type: ignore[import-untyped]

    k = round(hits * n)
    return float(beta.ppf(0.05, k, n - k + 1)) if k else 0.0


def test_the_sequential_interval_keeps_its_error_rate_under_daily_peeking() -> None:
    """A/A at 20%, 30 daily looks: the fixed-horizon test's error rate inflates well above 5%
    (the simulation can see peeking), the sequential interval's stays at or below 5%."""
    experiments = 600
    rates = _daily_peeks(0.2, 0.2, experiments, seed=1)
    assert rates["naive"] > 0.12, rates
    assert _upper_bound(rates["sequential"], experiments) <= 0.05, rates
    assert rates["sequential"] <= 0.05, rates


def test_the_sequential_interval_has_power_at_ten_points() -> None:
    """20% -> 30%, 600 conversations per arm by day 30 (the fixed-horizon test's 80%-power size
    is 294): the sequential interval excludes 0 at some look in most experiments (measured:
    80% of 300; the fixed-horizon test, peeking, 99%; A/A: 0.5% against 31%)."""
    rates = _daily_peeks(0.3, 0.2, 300, seed=2)
    assert rates["sequential"] >= 0.75, rates


def test_the_sequential_interval_of_means_keeps_its_error_rate_under_daily_peeking() -> None:
    """A/A on per-conversation shares (Beta(2, 3) per conversation, mean 0.4), 30 daily looks
    at 20 conversations per arm and day: the interval excludes no difference in at most 5%."""
    from services.experiments.statistics import sequential_interval_means

    rng = np.random.default_rng(4)
    experiments, days, per_day = 400, 30, 20
    errors = 0
    for _ in range(experiments):
        t = rng.beta(2, 3, days * per_day)
        c = rng.beta(2, 3, days * per_day)
        for d in range(1, days + 1):
            n = d * per_day
            low, high = sequential_interval_means(
                float(t[:n].mean()),
                float(t[:n].var()),
                n,
                float(c[:n].mean()),
                float(c[:n].var()),
                n,
            )
            if not low <= 0 <= high:
                errors += 1
                break
    assert _upper_bound(errors / experiments, experiments) <= 0.05, errors


@pytest.mark.parametrize(("x_t", "n_t", "x_c", "n_c"), [(30, 200, 20, 200), (51, 287, 44, 244)])
def test_score_test_and_srm_agree_with_scipy(x_t: int, n_t: int, x_c: int, n_c: int) -> None:
    from scipy.stats import chi2_contingency, chisquare  # type: ignore[import-untyped]

    table = [[x_t, n_t - x_t], [x_c, n_c - x_c]]
    expected = chi2_contingency(table, correction=False).pvalue
    assert score_test(x_t, n_t, x_c, n_c).p_value == pytest.approx(expected, rel=1e-9)
    assert sample_ratio_mismatch([n_t, n_c], [2, 1]).p_value == pytest.approx(
        chisquare([n_t, n_c], [(n_t + n_c) * 2 / 3, (n_t + n_c) / 3]).pvalue, rel=1e-12
    )
