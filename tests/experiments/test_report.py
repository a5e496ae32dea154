import math

import pytest

from services.experiments.report import wilson_interval


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
