import math

import pytest

from services.experiments.report import (
    difference_interval,
    minimum_detectable_effect,
    wilson_interval,
)


def test_wilson_interval_matches_the_formula_by_hand() -> None:
    low, high = wilson_interval(30, 100)
    # By hand: p=0.3, z=1.96 -> centre 0.3074, half-width 0.0885.
    assert low == pytest.approx(0.2189, abs=5e-4) and high == pytest.approx(0.3958, abs=5e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low0, high0 = wilson_interval(0, 20)
    assert low0 == 0.0 and 0.1 < high0 < 0.2
    low1, high1 = wilson_interval(20, 20)
    assert high1 == pytest.approx(1.0) and 0.8 < low1 < 0.9


def test_wilson_interval_covers_the_truth_about_95_percent_of_the_time() -> None:
    import random

    rng = random.Random(0)
    covered = 0
    for _ in range(2000):
        n, p = 50, 0.3
        k = sum(rng.random() < p for _ in range(n))
        low, high = wilson_interval(k, n)
        covered += low <= p <= high
    assert math.isclose(covered / 2000, 0.95, abs_tol=0.025)


def test_difference_interval_is_newcombes_published_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, Table II: 56/70 vs 48/80, method 10.
    low, high = difference_interval(56, 70, 48, 80)
    assert low == pytest.approx(0.0524, abs=1e-4) and high == pytest.approx(0.3339, abs=1e-4)
    low, high = difference_interval(9, 10, 3, 10)  # small arms: inside [-1, 1], not Wald's
    assert -1 < low < 0.6 < high < 1


def test_minimum_detectable_effect_against_the_power_function() -> None:
    from statistics import NormalDist

    normal = NormalDist()
    z = normal.inv_cdf(0.975)

    def power(base: float, lift: float, n: int) -> float:  # both tails of the z-test
        treated = base + lift
        se = math.sqrt(base * (1 - base) / n + treated * (1 - treated) / n)
        return normal.cdf(lift / se - z) + normal.cdf(-lift / se - z)

    for base, n in ((0.2, 291), (0.2, 16), (0.5, 100), (0.05, 1000)):
        lift = next(
            step / 10_000 for step in range(1, 10_000) if power(base, step / 10_000, n) >= 0.8
        )
        assert minimum_detectable_effect(base, n, n) == pytest.approx(lift, abs=2e-3), (base, n)
    # The arithmetic: 20% -> 30% needs about 290 conversations per arm.
    assert minimum_detectable_effect(0.2, 290, 290) == pytest.approx(0.10, abs=2e-3)
    assert minimum_detectable_effect(0.2, 0, 10) is None
    assert minimum_detectable_effect(0.9, 2, 2) is None  # nothing up to 100% is detectable
