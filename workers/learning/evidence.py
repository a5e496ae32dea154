"""Evidence about a candidate policy before it gets traffic: pure estimators over scored data.

Two questions, asked on held-out conversations (states PPO never trained on), with every
Q-value from a check Q fitted on other conversations than the state's own and than the Q that
PPO optimised (cross-fitting, see workers/learning/candidate_check.py), so that neither can be
won by exploiting one Q's errors:

- Theorem 1's premise (`improvement_check`): at held-out states, is the mean Q^{pi_i} of replies
  sampled from pi_{i+1} above that of replies sampled from pi_i? Paired per state, averaged over
  states, with a conversation-clustered bootstrap interval. A lower bound at or below zero
  flags the candidate (the gain is not shown).
- Its outcome rate (`rate_estimates`), from the logged conversations alone:
  * direct: the mean over logged start states of V(s_0) = E_{a ~ pi_{i+1}} Q(s_0, a);
  * doubly robust, per decision (Jiang & Li 2016; Thomas & Brunskill 2016), gamma = 1 so that
    the rewards of a conversation sum to its outcome:
        DR = sum_t [ w_t (r_t - Q(s_t, a_t)) + w_{t-1} V(s_t) ],   w_{-1} = 1,
        w_t = min(clip, w_{t-1} * rho_t),  rho_t = pi_{i+1}(a_t | s_t) / mu(a_t | s_t),
    mu the logged behaviour (pi_i, or an exploration persona: rho = 0, pi_{i+1} never draws
    one). Unbiased for any Q while the weights are unclipped; Q only reduces the variance. The
    effective sample size (Kish) of the conversations' final weights says what the correction
    rests on.

Everything here is numpy over plain records; the models live elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from workers.learning.held_out import conversation_resample_weights, percentile_interval


@dataclass(frozen=True)
class ScoredDecision:
    """One logged decision of a held-out conversation, scored for the estimators.

    q_logged: Q(s_t, a_t) of the logged action. v_new / v_old: the mean Q of the replies sampled
    at s_t from pi_{i+1} / pi_i. rho: pi_{i+1}(a_t | s_t) / mu(a_t | s_t), unclipped.
    """

    conversation_id: str
    index: int  # order within the conversation
    reward: float  # r_t: 1 on the decision whose turn reached the outcome, else 0
    q_logged: float
    v_new: float
    v_old: float
    rho: float


class Estimate(TypedDict):
    value: float | None
    lo: float | None
    hi: float | None


class ImprovementCheck(TypedDict):
    n_states: int
    n_conversations: int
    gain: Estimate  # mean over states of v_new - v_old
    flagged: bool  # the gain's lower bound is at or below zero (or there is no interval)


class RateEstimates(TypedDict):
    n_conversations: int
    logged: Estimate  # the held-out conversations' own outcome rate (behaviour mu)
    direct_parent: Estimate  # mean V_{pi_i}(s_0): the direct estimate of pi_i itself
    direct: Estimate  # mean V_{pi_{i+1}}(s_0)
    doubly_robust: Estimate
    ess: float  # Kish ESS of the conversations' final (clipped) weights
    weight_max: float
    clipped: int  # decisions whose cumulative weight hit the clip


def _estimate(rows: np.ndarray) -> Estimate:
    """rows[0] the statistic on the data, rows[1:] on bootstrap resamples."""
    value = float(rows[0]) if np.isfinite(rows[0]) else None
    lo, hi = percentile_interval(rows[1:]) if len(rows) > 1 else (None, None)
    return Estimate(value=value, lo=lo, hi=hi)


# Fewer conversations than this give no interval: resampling 1 conversation gives a width of 0
# (seen in a demo run: a doubly robust "interval" -0.201 to -0.201 from one conversation).
MIN_CLUSTERS = 5


def _clustered_means(
    values: Sequence[float], groups: Sequence[str], n_boot: int, seed: int
) -> Estimate:
    """The mean of values with a bootstrap interval that resamples whole groups (none with
    fewer than MIN_CLUSTERS groups)."""
    if not values:
        return Estimate(value=None, lo=None, hi=None)
    x = np.asarray(values, dtype=np.float64)
    if len(set(groups)) < MIN_CLUSTERS:
        return Estimate(value=float(x.mean()), lo=None, hi=None)
    w = np.vstack([np.ones((1, len(x))), conversation_resample_weights(groups, n_boot, seed)])
    totals = w.sum(1)
    rows = np.full(len(w), np.nan)
    np.divide(w @ x, totals, out=rows, where=totals > 0)
    return _estimate(rows)


def _by_conversation(decisions: Sequence[ScoredDecision]) -> dict[str, list[ScoredDecision]]:
    grouped: dict[str, list[ScoredDecision]] = {}
    for d in decisions:
        grouped.setdefault(d.conversation_id, []).append(d)
    return {c: sorted(ds, key=lambda d: d.index) for c, ds in sorted(grouped.items())}


def improvement_check(
    decisions: Sequence[ScoredDecision], *, n_boot: int = 1000, seed: int = 0
) -> ImprovementCheck:
    """Mean over held-out states of v_new - v_old, with a conversation-clustered interval."""
    gains = [d.v_new - d.v_old for d in decisions]
    groups = [d.conversation_id for d in decisions]
    gain = _clustered_means(gains, groups, n_boot, seed)
    return ImprovementCheck(
        n_states=len(decisions),
        n_conversations=len(set(groups)),
        gain=gain,
        flagged=gain["lo"] is None or gain["lo"] <= 0.0,
    )


def doubly_robust_value(
    trajectory: Sequence[ScoredDecision], clip: float
) -> tuple[float, float, int]:
    """One conversation's per-decision DR value of pi_{i+1} (gamma = 1), its final weight, and
    how many of its weights hit the clip."""
    value, previous, clipped = 0.0, 1.0, 0
    for d in trajectory:
        weight = previous * d.rho
        if weight > clip:
            weight, clipped = clip, clipped + 1
        value += weight * (d.reward - d.q_logged) + previous * d.v_new
        previous = weight
    return value, previous, clipped


def rate_estimates(
    decisions: Sequence[ScoredDecision],
    *,
    clip: float = 10.0,
    n_boot: int = 1000,
    seed: int = 0,
) -> RateEstimates:
    """Direct and doubly robust estimates of pi_{i+1}'s outcome rate on the held-out
    conversations (every decision of each, in order), beside pi_i's direct estimate and the
    logged rate; intervals resample conversations."""
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    bad = [d.rho for d in decisions if not (d.rho >= 0.0 and np.isfinite(d.rho))]
    if bad:
        raise ValueError(f"importance ratios must be finite and non-negative, got {bad[:3]}")
    conversations = _by_conversation(decisions)
    ids = list(conversations)
    logged, parent, direct, robust, finals = [], [], [], [], []
    clipped = 0
    for trajectory in conversations.values():
        logged.append(sum(d.reward for d in trajectory))
        parent.append(trajectory[0].v_old)
        direct.append(trajectory[0].v_new)
        value, final, hits = doubly_robust_value(trajectory, clip)
        robust.append(value)
        finals.append(final)
        clipped += hits
    total, squares = sum(finals), sum(f * f for f in finals)
    return RateEstimates(
        n_conversations=len(ids),
        logged=_clustered_means(logged, ids, n_boot, seed),
        direct_parent=_clustered_means(parent, ids, n_boot, seed),
        direct=_clustered_means(direct, ids, n_boot, seed),
        doubly_robust=_clustered_means(robust, ids, n_boot, seed),
        ess=total * total / squares if squares > 0 else 0.0,
        weight_max=max(finals, default=0.0),
        clipped=clipped,
    )


def flat_evidence(
    check: ImprovementCheck, rates: RateEstimates
) -> dict[str, float | int | bool | None]:
    """The scalars an iteration's metrics carry: check_gain(_lo/_hi), check_flagged,
    estimate_direct(_lo/_hi), estimate_dr(_lo/_hi), estimate_ess, ..."""
    flat: dict[str, float | int | bool | None] = {
        "check_states": check["n_states"],
        "check_flagged": check["flagged"],
        "estimate_conversations": rates["n_conversations"],
        "estimate_ess": round(rates["ess"], 3),
        "estimate_weight_max": round(rates["weight_max"], 6),
        "estimate_clipped": rates["clipped"],
    }
    named: list[tuple[str, Estimate]] = [
        ("check_gain", check["gain"]),
        ("estimate_logged", rates["logged"]),
        ("estimate_direct_parent", rates["direct_parent"]),
        ("estimate_direct", rates["direct"]),
        ("estimate_dr", rates["doubly_robust"]),
    ]
    for name, estimate in named:
        flat[name] = estimate["value"]
        flat[f"{name}_lo"] = estimate["lo"]
        flat[f"{name}_hi"] = estimate["hi"]
    return flat
