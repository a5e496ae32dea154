"""The demo report's statistics, against slow obvious versions (no model)."""

from __future__ import annotations

import math
import statistics

import pytest

from services.demo import Phase, ScoreSummary
from services.demo_report import score_difference
from services.experiments.report import ArmResult


def test_score_summary_is_the_mean_with_a_normal_interval() -> None:
    values = [0.5, -1.0, 2.0, 0.25, 1.5]
    s = ScoreSummary.of(values)
    half = 1.959964 * statistics.stdev(values) / math.sqrt(len(values))
    assert (s.n, s.mean) == (5, pytest.approx(statistics.mean(values)))
    assert (s.low, s.high) == (pytest.approx(s.mean - half), pytest.approx(s.mean + half))
    assert ScoreSummary.of([]).n == 0 and math.isnan(ScoreSummary.of([1.0]).low)


def _phase(control: list[float], treatment: list[float]) -> Phase:
    arms = [ArmResult("control", "pi0", 10, 10, 2), ArmResult("treatment", "it-1", 10, 10, 3)]
    scores = {"control": ScoreSummary.of(control), "treatment": ScoreSummary.of(treatment)}
    return Phase("A/B", "e", arms, 1.0, scores)


def test_score_difference_says_clearly_only_when_the_interval_excludes_zero() -> None:
    far = score_difference(_phase([0.0, 0.1, -0.1, 0.05] * 5, [1.0, 1.1, 0.9, 1.05] * 5))
    assert far.startswith("simulator score of suggestions clearly higher: +1.00")
    near = score_difference(_phase([0.0, 1.0, -1.0, 0.5], [0.1, 1.1, -0.9, 0.6]))
    assert "clearly" not in near and "higher: +0.10" in near
    assert "too few" in score_difference(_phase([1.0], [2.0, 3.0]))
