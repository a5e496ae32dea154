"""Held-out metrics: the vectorised bootstrap against a plain loop over resamples, the ranking
measure on a Q that ignores the reply and on one that reads it, the gate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from workers.learning.examples import StepExample
from workers.learning.held_out import (
    conversation_resample_weights,
    flat_metrics,
    held_out_metrics,
    outcome_metrics,
    rank_gate,
)
from workers.learning.ridge import fit_ridge


def small_examples(seed: int) -> tuple[list[StepExample], list[float], list[float]]:
    """7 conversations of 1-5 decisions, importance weights, Q and V values with ties."""
    rng = np.random.default_rng(seed)
    examples, q, v = [], [], []
    for c in range(7):
        outcome = int(rng.random() < 0.5)
        size = int(rng.integers(1, 6))
        for step in range(size):
            ret = outcome * 0.9 ** (size - 1 - step) + float(rng.normal(scale=0.1))
            examples.append(
                StepExample(
                    f"c{c}", step, size, (), "a", ret, outcome, weight=float(rng.uniform(0.3, 2))
                )
            )
            q.append(round(float(rng.uniform(-0.2, 1.2)), 1))  # rounded: ties in the AUC
            v.append(float(rng.uniform(0.2, 0.8)))
    return examples, q, v


def slow_statistics(rows: list[tuple[StepExample, float, float]]) -> dict[str, float]:
    """From the definitions, on an explicit list of (example, Q, V) with repeats."""
    out: dict[str, float] = {}
    w = [e.weight for e, _, _ in rows]
    total = sum(w)
    out["mse"] = sum(e.weight * (q - e.ret) ** 2 for e, q, _ in rows) / total
    out["brier"] = sum(e.weight * (min(max(q, 0), 1) - e.outcome) ** 2 for e, q, _ in rows) / total
    labels = [e.outcome for e, _, _ in rows]
    if len(set(labels)) == 2:
        out["auc"] = float(roc_auc_score(labels, [q for _, q, _ in rows], sample_weight=w))
    a = [q - v for _, q, v in rows]
    b = [e.ret - v for e, _, v in rows]
    mean_a = sum(wi * x for wi, x in zip(w, a, strict=True)) / total
    mean_b = sum(wi * x for wi, x in zip(w, b, strict=True)) / total
    cov = sum(wi * (x - mean_a) * (y - mean_b) for wi, x, y in zip(w, a, b, strict=True))
    var_a = sum(wi * (x - mean_a) ** 2 for wi, x in zip(w, a, strict=True))
    var_b = sum(wi * (y - mean_b) ** 2 for wi, y in zip(w, b, strict=True))
    if len({e.ret for e, _, _ in rows}) > 1:  # with one return there is nothing to rank
        out["corr"] = cov / math.sqrt(var_a * var_b)
    return out


def slow_intervals(
    examples: list[StepExample], q: list[float], v: list[float], n_boot: int, seed: int
) -> dict[str, dict[str, tuple[float, float]]]:
    """Resample conversations as the docstring says, rebuild each sample, compute, take
    percentiles."""
    ids = sorted({e.conversation_id for e in examples})
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    values: dict[str, dict[str, list[float]]] = {"all": {}, "first_half": {}}
    for row in picks:
        sample = [
            (e, qi, vi)
            for pick in row
            for e, qi, vi in zip(examples, q, v, strict=True)
            if e.conversation_id == ids[pick]
        ]
        first = [r for r in sample if r[0].step < r[0].n_steps / 2]
        for group, rows in (("all", sample), ("first_half", first)):
            for name, value in slow_statistics(rows).items():
                values[group].setdefault(name, []).append(value)
    return {
        group: {
            name: (float(np.percentile(xs, 2.5)), float(np.percentile(xs, 97.5)))
            for name, xs in by_name.items()
        }
        for group, by_name in values.items()
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustered_bootstrap_matches_a_loop_over_rebuilt_samples(seed: int) -> None:
    examples, q, v = small_examples(seed)
    metrics = held_out_metrics(q, examples, v_values=v, n_boot=60, seed=seed + 10)
    slow = slow_intervals(examples, q, v, n_boot=60, seed=seed + 10)
    for group in ("all", "first_half"):
        got = metrics[group]  # type: ignore[literal-required]
        for name in ("mse", "auc", "brier"):
            lo, hi = slow[group][name]
            assert got[f"{name}_lo"] == pytest.approx(lo, abs=1e-9), (group, name)
            assert got[f"{name}_hi"] == pytest.approx(hi, abs=1e-9), (group, name)
    assert (metrics["rank"]["corr_lo"], metrics["rank"]["corr_hi"]) == pytest.approx(
        slow["all"]["corr"], abs=1e-9
    )
    point = slow_statistics(list(zip(examples, q, v, strict=True)))
    assert metrics["all"]["mse"] == pytest.approx(point["mse"])
    assert metrics["rank"]["corr"] == pytest.approx(point["corr"])
    assert metrics["all"]["auc"] == pytest.approx(point.get("auc"))


def test_resample_weights_count_the_draws_of_each_conversation() -> None:
    ids = ["b", "a", "b", "c", "a", "a"]
    weights = conversation_resample_weights(ids, n_boot=5, seed=4)
    picks = np.random.default_rng(4).integers(0, 3, size=(5, 3))  # a=0, b=1, c=2
    for row, drawn in zip(weights, picks, strict=True):
        assert row.tolist() == [float(list(drawn).count("abc".index(c))) for c in ids]


def test_outcome_metrics_weights_are_repeats() -> None:
    q, returns, outcomes = [0.1, 0.7, 0.4, 0.4], [0.0, 1.0, 1.0, 0.0], [0, 1, 1, 0]
    weighted = outcome_metrics(q, returns, outcomes, weights=[2, 1, 3, 1])
    repeated = outcome_metrics(
        [0.1, 0.1, 0.7, 0.4, 0.4, 0.4, 0.4], [0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0]
    )
    for name in ("mse", "auc", "brier"):
        assert weighted[name] == pytest.approx(repeated[name])  # type: ignore[literal-required]
    assert weighted["auc_lo"] is None  # no conversations, no interval


def synthetic_decisions(
    n_conversations: int, seed: int
) -> tuple[list[StepExample], np.ndarray, np.ndarray, np.ndarray]:
    """G = state effect + reply effect + noise; features of the state, of the reply, and junk."""
    rng = np.random.default_rng(seed)
    n = n_conversations * 4
    state, reply, junk = (rng.normal(size=(n, 6)) for _ in range(3))
    conversation_effect = rng.normal(scale=0.5, size=n_conversations).repeat(4)
    returns = state @ rng.normal(size=6) + 0.5 * reply @ rng.normal(size=6) + conversation_effect
    returns += rng.normal(size=n)
    examples = [
        StepExample(f"c{i // 4}", i % 4, 4, (), "a", float(g), int(g > 0))
        for i, g in enumerate(returns)
    ]
    return examples, state, reply, junk


def test_ranking_measure_is_zero_for_a_q_that_ignores_the_reply() -> None:
    examples, state, reply, junk = synthetic_decisions(400, seed=0)
    train, held = np.arange(800), np.arange(800, 1600)  # conversations 0-199 | 200-399
    returns = np.array([e.ret for e in examples])
    groups = [e.conversation_id for e in examples]
    alphas = [0.1, 1.0, 10.0, 100.0, 1000.0]

    def ridge(features: np.ndarray) -> np.ndarray:
        fit = fit_ridge(
            features[train], returns[train], np.ones(800), groups[:800], alphas, n_folds=5
        )
        prediction: np.ndarray = features[held] @ fit.coef + fit.intercept
        return prediction

    v = ridge(state)
    ignores = ridge(np.hstack([state, junk]))  # the state, and noise where the reply would be
    reads = ridge(np.hstack([state, reply]))
    held_examples = [examples[i] for i in held]
    blind = held_out_metrics(ignores, held_examples, v_values=v, n_boot=500, seed=1)["rank"]
    seeing = held_out_metrics(reads, held_examples, v_values=v, n_boot=500, seed=1)["rank"]
    assert blind["corr_lo"] is not None and blind["corr_hi"] is not None
    assert blind["corr_lo"] < 0.0 < blind["corr_hi"], blind
    assert abs(blind["corr"] or 0.0) < 0.1, blind
    assert seeing["corr_lo"] is not None and seeing["corr_lo"] > 0.3, seeing
    # Both rank outcomes: the pooled AUC alone cannot tell them apart.
    auc_blind = held_out_metrics(ignores, held_examples, n_boot=0)["all"]["auc"]
    assert auc_blind is not None and auc_blind > 0.75
    # A Q equal to V ranks nothing at all.
    same = held_out_metrics(v, held_examples, v_values=v, n_boot=50, seed=1)["rank"]
    assert (same["corr"], same["corr_lo"], same["corr_hi"]) == (0.0, 0.0, 0.0)


def test_resamples_where_every_return_is_the_same_rank_nothing() -> None:
    """Ten one-decision conversations, two of them successes: a resample that draws neither
    has nothing to rank and is left out, as an AUC over one class is."""
    examples = [StepExample(f"c{i}", 0, 1, (), "a", float(i < 2), int(i < 2)) for i in range(10)]
    v = [0.2 + 0.01 * i for i in range(10)]
    q = [vi + (0.5 if i < 2 else -0.1) for i, vi in enumerate(v)]  # reads the reply perfectly
    rank = held_out_metrics(q, examples, v_values=v, n_boot=400, seed=0)["rank"]
    assert rank["corr_lo"] is not None and rank["corr_lo"] > 0.9, rank
    assert rank["corr"] is not None and rank["corr"] > 0.99
    none = [StepExample(f"c{i}", 0, 1, (), "a", 0.0, 0) for i in range(10)]
    nothing = held_out_metrics(q, none, v_values=v, n_boot=50)["rank"]
    assert (nothing["corr"], nothing["corr_lo"], nothing["corr_hi"]) == (None, None, None)


def test_gate_passes_only_above_the_floor() -> None:
    flat = {"q_rank_corr": 0.2, "q_rank_corr_lo": 0.05, "q_rank_corr_hi": 0.3, "q_auc": 0.9}
    assert rank_gate(flat, 0.0)["passed"]
    assert "above the floor 0.0" in rank_gate(flat, 0.0)["reason"]
    assert not rank_gate(flat, 0.05)["passed"]  # at the floor is not above it
    failed = rank_gate({**flat, "q_rank_corr_lo": -0.01}, 0.0)
    assert not failed["passed"] and failed["q_rank_corr_lo"] == -0.01
    assert "not above" in failed["reason"]
    missing = rank_gate({"q_auc": 0.9}, 0.0)
    assert not missing["passed"] and "no held-out ranking interval" in missing["reason"]


def test_flat_metrics_names() -> None:
    examples, q, v = small_examples(0)
    flat = flat_metrics(
        held_out_metrics(q, examples, v_values=v, n_boot=20), {"head_alpha": 10.0, "v_alpha": 3.0}
    )
    expected = {"q_n", "q_mse", "q_auc", "q_brier", "q_rank_corr", "q_rank_corr_lo"}
    expected |= {"q_auc_lo", "q_auc_hi", "q_auc_first_half", "q_auc_first_half_lo"}
    expected |= {"q_mse_first_half_hi", "q_v_mse", "q_head_alpha", "q_v_alpha", "q_rank_n"}
    assert expected <= set(flat)
    assert flat["q_head_alpha"] == 10.0
    assert all(value is None or isinstance(value, int | float) for value in flat.values())
    assert flat_metrics({}, {}) == {}
