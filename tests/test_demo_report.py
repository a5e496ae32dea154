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


def _result(metrics: dict[str, object], check: object = None) -> object:
    from services.demo import DemoConfig, DemoResult, IterationSummary
    from services.simulator.scenarios import SCENARIOS

    summary = IterationSummary("it", "pi0", "it-1", "succeeded", metrics, 1.0, check)  # type: ignore[arg-type]
    return DemoResult(
        DemoConfig(), SCENARIOS["renovation"], [_phase([], []), _phase([], [])], [summary],
        {}, 1.0, "sqlite://", [],
    )  # fmt: skip


def test_the_report_puts_the_pre_traffic_estimate_beside_the_measured_rate() -> None:
    from services.demo_report import evidence_lines

    metrics = {
        "check_flagged": False, "check_states": 20, "check_gain": 0.02, "check_gain_lo": 0.01,
        "check_gain_hi": 0.03, "check_gain_ppo_q": 0.1, "estimate_conversations": 8,
        "estimate_dr": 0.25, "estimate_dr_lo": 0.2, "estimate_dr_hi": 0.35,
        "estimate_direct": 0.2, "estimate_ess": 5.0, "estimate_clipped": 0,
    }  # fmt: skip
    lines = evidence_lines(_result(metrics))  # type: ignore[arg-type]
    # The treatment arm of the A/B after iteration 1 converted 3 of 10: inside [0.2, 0.35].
    assert "not flagged" in lines[0] and "0.020 (0.010 to 0.030)" in lines[0]
    assert "measured in the A/B: 0.300" in lines[1] and "inside the doubly robust" in lines[1]
    outside = evidence_lines(_result({**metrics, "estimate_dr_hi": 0.28, "check_flagged": True}))  # type: ignore[arg-type]
    assert "FLAGGED" in outside[0] and "outside the doubly robust" in outside[1]
    assert evidence_lines(_result({})) == ["iteration 1 (it-1): no candidate check ran"]  # type: ignore[arg-type]


def test_scenario_check_correlates_q_with_the_simulator_within_states(tmp_path: object) -> None:
    import json
    from pathlib import Path

    from services.demo import scenario_check
    from services.simulator.scenarios import SCENARIOS

    scenario = SCENARIOS["renovation"]
    state = [["customer", "Hi, how much for a kitchen renovation?"]]
    texts = [
        "Hello! What size is your kitchen? We offer a free quote.",
        "No.",
        "Could we book a visit on Thursday to measure? It is free.",
        "Price depends.",
    ]
    rows = []
    for c in range(6):
        scores = [scenario.score(t, [tuple(x) for x in state]) for t in texts]  # type: ignore[misc]
        replies = [
            {"text": t, "q_check": 2 * s + c, "q_ppo": -s}
            for t, s in zip(texts, scores, strict=True)
        ]
        rows.append(
            {
                "conversation_id": f"c{c}",
                "state": state,
                "replies": {"a": replies[:2], "b": replies[2:]},
            }
        )
    path = Path(str(tmp_path)) / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check = scenario_check(path, scenario, n_boot=50)
    assert check is not None and (check.states, check.replies) == (6, 24)
    # A per-state offset (c) does not count: only how Q orders replies within a state.
    assert check.check_q[0] == pytest.approx(1.0) and check.ppo_q[0] == pytest.approx(-1.0)
    assert scenario_check(Path(str(tmp_path)) / "missing.jsonl", scenario) is None


def _long_result() -> object:
    from services.demo import DemoConfig, DemoResult, IterationSummary
    from services.simulator.scenarios import SCENARIOS

    candidate = "it-8344764c14c3432bbf3feec5"
    alone = Phase(
        "pi0 alone",
        "e0",
        [
            ArmResult(
                "pi0",
                "pi0",
                32,
                32,
                9,
                {"accepted": 20, "edited": 5, "rejected": 4, "abstained": 3},
            )
        ],
        1.0,
        {"pi0": ScoreSummary.of([0.1, 0.2, -0.3])},
    )
    ab = Phase(
        f"A/B pi0 vs {candidate}",
        "e1",
        [
            ArmResult("control", "pi0", 16, 16, 4, {"accepted": 10}),
            ArmResult("treatment", candidate, 16, 15, 6, {"accepted": 9, "rejected": 1}),
        ],
        1.0,
        {
            "control": ScoreSummary.of([0.1, -0.2, 0.05]),
            "treatment": ScoreSummary.of([0.3, 0.2, -0.1]),
        },
    )
    summary = IterationSummary(
        "8344764c-aaaa", "pi0", candidate, "deployed", {"q_auc": 0.61}, 300.0
    )
    return DemoResult(
        DemoConfig(), SCENARIOS["renovation"], [alone, ab], [summary], {}, 600.0, "sqlite://", []
    )


def test_the_terminal_report_is_legible_in_80_columns() -> None:
    import io

    from rich.console import Console

    from services.demo_report import print_report

    out = io.StringIO()
    print_report(_long_result(), Console(file=out, width=80, color_system=None))  # type: ignore[arg-type]
    text = out.getvalue()
    table = text.split("phase 0:")[0]
    assert all(len(line) <= 80 for line in table.splitlines())
    assert "…" not in table, "a cell was cut"
    for header in ("policy", "outcome (CI)", "acc", "edi", "rej", "abs", "sim. score"):
        assert header in table
    assert "it-8344764c" in table and "28% (16-45)" in table  # 9 of 32, Wilson


def test_differences_are_points_and_compare_the_arms_of_one_ab() -> None:
    from services.demo_report import ab_difference, verdict
    from services.experiments.statistics import difference_interval

    result = _long_result()
    ab = result.phases[1]  # type: ignore[attr-defined]
    low, high = difference_interval(6, 15, 4, 16)
    line = ab_difference(ab)
    # 6/15 - 4/16 = 0.40 - 0.25: +15.0 points, against this A/B's own control (not pi0 alone).
    assert "pi0 25.0% (n 16) vs it-8344764c 40.0% (n 15): +15.0 pp" in line
    assert f"(95% CI {low * 100:+.1f} pp to {high * 100:+.1f} pp)" in line
    said = verdict(ab)
    assert "+15.0 pp" in said and "%" not in said.split("pp")[0]
    assert "detects (80% power) only lifts of" in said


def test_clustered_score_summary_treats_each_conversation_as_the_unit() -> None:
    from services.demo import ScoreSummary

    # Equal-size groups: the standard error of the G group means (the definition).
    groups = [[0.1, 0.3], [0.5, 0.7], [-0.2, 0.0], [0.9, 1.1]]
    means = [sum(g) / len(g) for g in groups]
    grand = sum(means) / len(means)
    se_of_means = math.sqrt(sum((m - grand) ** 2 for m in means) / (len(means) - 1) / len(means))
    summary = ScoreSummary.clustered(groups)
    assert summary.n == 8 and summary.mean == pytest.approx(grand)
    assert summary.se == pytest.approx(se_of_means)
    # Values alike within a conversation: wider than the per-suggestion interval, which
    # counts every suggestion as independent.
    assert summary.se > ScoreSummary.of([v for g in groups for v in g]).se
    # Unequal sizes: the ratio mean, and the cluster-robust variance written out.
    uneven = [[1.0], [0.0, 0.0, 0.0], [0.5, 0.5]]
    total = sum(len(g) for g in uneven)
    mean = sum(sum(g) for g in uneven) / total
    variance = 3 / 2 * sum((sum(g) - mean * len(g)) ** 2 for g in uneven) / total**2
    result = ScoreSummary.clustered([*uneven, []])
    assert result.mean == pytest.approx(mean) and result.se == pytest.approx(math.sqrt(variance))
    assert math.isnan(ScoreSummary.clustered([[1.0, 2.0]]).se)
