from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.experiments.assignment import (
    DEFAULT_PERSONAS,
    choose_index,
    explore,
    unit_interval,
)


def test_choose_index_matches_a_plain_loop() -> None:
    weights = [0.2, 0.0, 0.5, 0.3]
    for k in range(1000):
        u = k / 1000
        cumulative, expected = 0.0, None
        for i, w in enumerate(weights):
            cumulative += w
            if w > 0 and u * sum(weights) < cumulative:
                expected = i
                break
        assert choose_index(weights, u) == expected


@given(st.lists(st.floats(0, 10), min_size=1, max_size=6), st.floats(0, 0.999999))
def test_choose_index_never_picks_a_zero_weight_arm(weights: list[float], u: float) -> None:
    if sum(weights) <= 0:
        with pytest.raises(ValueError):
            choose_index(weights, u)
        return
    assert weights[choose_index(weights, u)] > 0


def test_assignment_frequencies_follow_weights() -> None:
    counts = Counter(choose_index([1, 3], unit_interval("salt", f"unit-{i}")) for i in range(8000))
    assert abs(counts[1] / 8000 - 0.75) < 0.02
    assert unit_interval("salt", "a") == unit_interval("salt", "a") != unit_interval("s2", "a")


def test_exploration_probabilities() -> None:
    assert explore(None, "x").persona is None and explore(None, "x").probability == 1.0
    always = explore({"epsilon": 1.0}, "s", "c", "1")
    assert always.persona in DEFAULT_PERSONAS
    assert always.probability == pytest.approx(1 / len(DEFAULT_PERSONAS))
    draws = [explore({"epsilon": 0.3}, "s", f"c{i}") for i in range(4000)]
    explored = [d for d in draws if d.persona is not None]
    assert abs(len(explored) / 4000 - 0.3) < 0.03
    assert {round(d.probability, 9) for d in draws} == {0.7, 0.05}
    assert len({d.persona.name for d in explored if d.persona}) == len(DEFAULT_PERSONAS)
