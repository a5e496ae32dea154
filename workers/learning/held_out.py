"""Held-out metrics of a fitted Q, each with a conversation-clustered bootstrap interval.

Decisions of one conversation share their outcome, so they are not independent draws: an
interval that resampled decisions would be far too narrow. Every interval here resamples whole
conversations with replacement (B times, seeded) and reports the 2.5th and 97.5th percentiles.

Two kinds of metric:

- against the outcome (`all`, `first_half`): MSE of Q against the return G, ROC AUC of Q
  against the conversation's outcome, Brier score of clip(Q, 0, 1). A Q that only reads the
  state can do well on these.
- the ranking measure (`rank`): what PPO uses is Q(s, a) - V(s), the part of Q that differs
  between replies to the same state. With V(s) a state-only value fitted beside Q, the
  weighted correlation of Q - V with G - V on held-out decisions says whether Q ranks replies:
  near zero for a Q that ignores the reply, positive for one that reads it.

Every statistic is weighted by the examples' importance weights; a bootstrap resample
multiplies each weight by how often its conversation was drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict

import numpy as np
from numpy.typing import NDArray

from workers.learning.examples import StepExample

Array = NDArray[np.float64]
INTERVAL_PERCENTILES = (2.5, 97.5)
# Below this variance Q - V (or G - V) is constant: it ranks nothing, the correlation is 0.
_FLAT = 1e-12


class OutcomeMetrics(TypedDict):
    n: int
    mse: float | None  # of Q against the return G
    mse_lo: float | None
    mse_hi: float | None
    auc: float | None  # ROC AUC of Q against the conversation's outcome; None with one class
    auc_lo: float | None
    auc_hi: float | None
    brier: float | None  # of clip(Q, 0, 1) against the outcome
    brier_lo: float | None
    brier_hi: float | None


class RankMetrics(TypedDict):
    n: int
    corr: float | None  # weighted Pearson correlation of Q - V with G - V
    corr_lo: float | None
    corr_hi: float | None
    v_mse: float | None  # V's own MSE against G: how much of G the state alone explains


class QMetrics(TypedDict, total=False):
    all: OutcomeMetrics  # every held-out decision
    first_half: OutcomeMetrics  # step < n_steps / 2: late turns often state the outcome
    rank: RankMetrics  # present when a V was given; corr None when every return is the same


# -- statistics of many weightings at once --------------------------------------------------
# Each takes W of shape (rows, n): row r weighs example i by W[r, i]. Row 0 is the data as it
# is; the others are bootstrap resamples. A row with no usable weight gives NaN.


def _ratio(numerator: Array, denominator: Array) -> Array:
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def weighted_mse_rows(w: Array, prediction: Array, target: Array) -> Array:
    return _ratio(w @ (prediction - target) ** 2, w.sum(1))


def weighted_auc_rows(w: Array, score: Array, label: Array) -> Array:
    """P(score of a positive > score of a negative), pairs weighted by w_p * w_n, ties 1/2."""
    order = np.argsort(score, kind="stable")
    ordered = score[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # one per distinct score
    positive = label[order] == 1
    w_sorted = w[:, order]
    pos = np.add.reduceat(w_sorted * positive, starts, axis=1)  # (rows, distinct scores)
    neg = np.add.reduceat(w_sorted * ~positive, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(1)
    return _ratio(wins, pos.sum(1) * neg.sum(1))


def weighted_variance_rows(w: Array, x: Array) -> Array:
    total = w.sum(1)
    x = x - x.mean()
    return _ratio(w @ x**2, total) - _ratio(w @ x, total) ** 2


def weighted_corr_rows(w: Array, x: Array, y: Array) -> Array:
    """Weighted Pearson correlation; 0 where x or y is constant (it then predicts nothing)."""
    total = w.sum(1)
    # Centring on the plain means first keeps the one-pass moments below exact enough.
    x, y = x - x.mean(), y - y.mean()
    mean_x, mean_y = _ratio(w @ x, total), _ratio(w @ y, total)
    var_x, var_y = weighted_variance_rows(w, x), weighted_variance_rows(w, y)
    cov = _ratio(w @ (x * y), total) - mean_x * mean_y
    flat = (var_x <= _FLAT) | (var_y <= _FLAT)
    corr = np.where(flat, 0.0, cov / np.sqrt(np.where(flat, 1.0, var_x * var_y)))
    corr = np.clip(corr, -1.0, 1.0)
    corr[~(total > 0)] = np.nan
    return corr


# -- the bootstrap --------------------------------------------------------------------------


def conversation_resample_weights(conversation_ids: Sequence[str], n_boot: int, seed: int) -> Array:
    """(n_boot, n): how often each example's conversation was drawn in each resample.

    The draw: number the k distinct conversations in sorted order, then
    `np.random.default_rng(seed).integers(0, k, size=(n_boot, k))`; row b draws those k.
    """
    ids = sorted(set(conversation_ids))
    code = {c: i for i, c in enumerate(ids)}
    codes = np.array([code[c] for c in conversation_ids], dtype=np.int64)
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    counts = np.zeros((n_boot, len(ids)))
    np.add.at(counts, (np.arange(n_boot)[:, None], picks), 1.0)
    resampled: Array = counts[:, codes]
    return resampled


def percentile_interval(values: Array) -> tuple[float | None, float | None]:
    """The 95% percentile interval of the finite values (resamples where the statistic is
    undefined, e.g. an AUC over one class, are left out)."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return None, None
    lo, hi = np.percentile(finite, INTERVAL_PERCENTILES)
    return float(lo), float(hi)


def _point_and_interval(rows: Array) -> tuple[float | None, float | None, float | None]:
    point = float(rows[0]) if np.isfinite(rows[0]) else None
    lo, hi = percentile_interval(rows[1:]) if len(rows) > 1 else (None, None)
    return point, lo, hi


def _outcome_rows(w: Array, q: Array, returns: Array, outcomes: Array) -> OutcomeMetrics:
    n = w.shape[1]
    if n == 0:
        return OutcomeMetrics(
            n=0, mse=None, mse_lo=None, mse_hi=None, auc=None, auc_lo=None, auc_hi=None,
            brier=None, brier_lo=None, brier_hi=None,
        )  # fmt: skip
    mse = _point_and_interval(weighted_mse_rows(w, q, returns))
    auc = _point_and_interval(weighted_auc_rows(w, q, outcomes))
    brier = _point_and_interval(weighted_mse_rows(w, np.clip(q, 0.0, 1.0), outcomes))
    return OutcomeMetrics(
        n=n, mse=mse[0], mse_lo=mse[1], mse_hi=mse[2], auc=auc[0], auc_lo=auc[1], auc_hi=auc[2],
        brier=brier[0], brier_lo=brier[1], brier_hi=brier[2],
    )  # fmt: skip


def outcome_metrics(
    q_values: Sequence[float],
    returns: Sequence[float],
    outcomes: Sequence[int],
    weights: Sequence[float] | None = None,
) -> OutcomeMetrics:
    """Weighted MSE against the returns, ROC AUC and Brier score against the outcomes (no
    intervals: those need the conversations, see held_out_metrics)."""
    q = np.asarray(q_values, dtype=np.float64)
    w = np.ones(len(q)) if weights is None else np.asarray(weights, dtype=np.float64)
    return _outcome_rows(
        w[None, :],
        q,
        np.asarray(returns, dtype=np.float64),
        np.asarray(outcomes, dtype=np.float64),
    )


def held_out_metrics(
    q_values: Sequence[float],
    examples: Sequence[StepExample],
    *,
    v_values: Sequence[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> QMetrics:
    """Outcome metrics over all decisions and the first half of each conversation, and with
    v_values (V(s) of the same decisions) the ranking measure; n_boot = 0: no intervals."""
    if len(q_values) != len(examples):
        raise ValueError(f"{len(q_values)} Q values for {len(examples)} examples")
    if v_values is not None and len(v_values) != len(examples):
        raise ValueError(f"{len(v_values)} V values for {len(examples)} examples")
    if n_boot < 0:
        raise ValueError(f"n_boot must not be negative, not {n_boot}")
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    # Small products, where BLAS threads cost more than they give; and once started, OpenBLAS's
    # threads were seen to slow the process's next torch work tenfold on two cores.
    with threadpool_limits(1, user_api="blas"):
        return _held_out_metrics(q_values, examples, v_values, n_boot, seed)


def _held_out_metrics(
    q_values: Sequence[float],
    examples: Sequence[StepExample],
    v_values: Sequence[float] | None,
    n_boot: int,
    seed: int,
) -> QMetrics:
    q = np.asarray(q_values, dtype=np.float64)
    returns = np.array([e.ret for e in examples], dtype=np.float64)
    outcomes = np.array([e.outcome for e in examples], dtype=np.float64)
    weight = np.array([e.weight for e in examples], dtype=np.float64)
    w = weight[None, :]
    if n_boot and examples:
        resampled = conversation_resample_weights(
            [e.conversation_id for e in examples], n_boot, seed
        )
        w = np.vstack([w, resampled * weight])
    first = np.array([e.step < e.n_steps / 2 for e in examples], dtype=bool)
    metrics = QMetrics(
        all=_outcome_rows(w, q, returns, outcomes),
        first_half=_outcome_rows(w[:, first], q[first], returns[first], outcomes[first]),
    )
    if v_values is not None:
        v = np.asarray(v_values, dtype=np.float64)
        corr_rows = weighted_corr_rows(w, q - v, returns - v)
        # Where every return is the same (all drawn conversations ended alike) there is nothing
        # to rank: G - V is then just -V. Undefined, like an AUC over one class.
        corr_rows[weighted_variance_rows(w, returns) <= _FLAT] = np.nan
        corr = _point_and_interval(corr_rows)
        v_mse = weighted_mse_rows(w[:1], v, returns)[0] if examples else np.nan
        metrics["rank"] = RankMetrics(
            n=len(examples),
            corr=corr[0],
            corr_lo=corr[1],
            corr_hi=corr[2],
            v_mse=float(v_mse) if np.isfinite(v_mse) else None,
        )
    return metrics


# -- reporting and the gate -----------------------------------------------------------------


def flat_metrics(metrics: QMetrics, fit: Mapping[str, float | None]) -> dict[str, float | None]:
    """Scalars for the iteration's metrics: q_auc, q_auc_lo, q_auc_first_half_hi, ...,
    q_rank_corr(_lo, _hi), q_v_mse and the fit's numbers (q_head_alpha, q_v_alpha)."""
    flat: dict[str, float | None] = {}
    groups = [("", metrics.get("all")), ("_first_half", metrics.get("first_half"))]
    for suffix, values in groups:
        if values is None:
            continue
        for name, value in values.items():
            base, _, bound = name.partition("_")
            key = f"q_{base}{suffix}" + (f"_{bound}" if bound else "")
            flat[key] = value if isinstance(value, int | float) else None
    rank = metrics.get("rank")
    if rank is not None:
        flat["q_rank_n"] = rank["n"]
        flat["q_rank_corr"] = rank["corr"]
        flat["q_rank_corr_lo"] = rank["corr_lo"]
        flat["q_rank_corr_hi"] = rank["corr_hi"]
        flat["q_v_mse"] = rank["v_mse"]
    for name, value in fit.items():
        flat[f"q_{name}"] = value
    return flat


class RankGate(TypedDict):
    passed: bool
    rank_floor: float
    q_rank_corr: float | None
    q_rank_corr_lo: float | None
    q_rank_corr_hi: float | None
    reason: str


def rank_gate(flat: Mapping[str, object], floor: float) -> RankGate:
    """Pass when the interval's lower bound of the ranking measure lies above the floor.

    A point estimate passes by luck on a few dozen conversations; the lower bound passes only
    when Q - V predicts G - V on most resamples of them.
    """

    def number(key: str) -> float | None:
        value = flat.get(key)
        return float(value) if isinstance(value, int | float) else None

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    corr, lo, hi = number("q_rank_corr"), number("q_rank_corr_lo"), number("q_rank_corr_hi")
    passed = lo is not None and lo > floor
    if lo is None:
        reason = (
            "no held-out ranking interval (nothing held out, every held-out return the same, "
            "or eval_bootstrap = 0)"
        )
    else:
        relation = "above" if passed else "not above"
        reason = (
            f"held-out corr(Q - V, G - V) = {fmt(corr)}, 95% interval [{fmt(lo)}, {fmt(hi)}]: "
            f"lower bound {relation} the floor {floor}"
        )
    return RankGate(
        passed=passed,
        rank_floor=floor,
        q_rank_corr=corr,
        q_rank_corr_lo=lo,
        q_rank_corr_hi=hi,
        reason=reason,
    )
