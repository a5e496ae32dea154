"""What an iteration's decisions are worth: returns, off-policy weights, effective sample size.

The rules (Jiang et al. 2025, section 2.1), shared by the SQL that computes returns where the
data lives (services/conversations/repository.py) and the tests' slow reference:

* A *decision* is a suggestion the policy made (answered or not: a suggestion the business
  never sent is still a decision, with the return of what followed), or, where no suggestion
  was logged, a business turn written without one. Its state is what the suggestion saw: the
  messages up to its `state_seq` (for a turn without a suggestion: the messages before it).
* A *business turn* is a maximal run of consecutive business messages: two messages in a row
  count as one reply, as the paper merges them.
* The outcome absorbs: the first outcome observed ends the episode. Reward 1 lands on the
  deciding business turn, the last one that started at or before the outcome; decisions made
  after it (state at or after that turn's start) do not exist, and later outcomes are ignored.
  An outcome before the first business turn leaves the conversation with no decisions.
* G = gamma^(k - 1), where k is the number of business turns from the decision's state up to
  and including the deciding one; 0 when the conversation ended without an outcome. So G is
  always in [0, 1].

Off-policy data (exploration personas) enters the Q regression with bounded *weights*, never by
scaling the return: see `importance_weights`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

DecisionSource = Literal["policy", "exploration", "imported", "unlogged", "other_arms"]
DECISION_SOURCES: tuple[DecisionSource, ...] = get_args(DecisionSource)
DEFAULT_SOURCES: tuple[DecisionSource, ...] = ("policy", "exploration")
OffPolicyEstimator = Literal["weighted", "truncated"]


@dataclass(frozen=True)
class ReturnsConfig:
    """Which decisions become training data for Q^{pi_i}, and how they are weighted."""

    gamma: float = field(default=1.0, metadata={"help": "Discount per business turn, in (0, 1]."})
    sources: tuple[DecisionSource, ...] = field(
        default=DEFAULT_SOURCES,
        metadata={
            "help": "Data sources to train on. policy: suggestions pi_i made without "
            "exploration; exploration: pi_i's suggestions with an exploration persona (weighted "
            "off-policy); imported: suggestions and business turns of imported history; "
            "unlogged: business turns written with no suggestion logged; other_arms: "
            "suggestions of other policies (uncorrected: weight 1). Q^{pi_i} is defined by the "
            "first two; the others are opt-in."
        },
    )
    abstentions: Literal["as_action", "drop"] = field(
        default="as_action",
        metadata={
            "help": "as_action: an abstention is the decision ABSTAIN_MARKER; drop: it is left "
            "out of Q's data (it still counts in the returns of earlier decisions)."
        },
    )
    off_policy: OffPolicyEstimator = field(
        default="weighted",
        metadata={
            "help": "How later exploration choices are corrected. weighted: per-decision "
            "weighted importance sampling, the product of the later ratios pi_i/mu used as the "
            "regression weight (self-normalised by the fit), capped at importance_clip; "
            "truncated: Retrace-style c = min(1, rho) per later choice."
        },
    )
    importance_clip: float = field(
        default=10.0,
        metadata={"help": "Cap on one decision's importance weight (weighted estimator), >= 1."},
    )
    window_days: float | None = field(
        default=None, metadata={"help": "Only conversations created within this many days."}
    )
    business_id: str | None = field(default=None, metadata={"help": "Only this business."})
    max_conversations: int | None = field(
        default=None, metadata={"help": "Most recent ended conversations to use at most."}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if not math.isfinite(self.importance_clip) or self.importance_clip < 1.0:
            raise ValueError(f"importance_clip must be a number >= 1, got {self.importance_clip}")
        if self.window_days is not None and not self.window_days > 0:
            raise ValueError("window_days must be positive")
        if self.max_conversations is not None and self.max_conversations < 1:
            raise ValueError("max_conversations must be at least 1")
        if not self.sources:
            raise ValueError(f"sources must name at least one of {DECISION_SOURCES}")
        unknown = [s for s in self.sources if s not in DECISION_SOURCES]
        if unknown:
            raise ValueError(f"unknown sources {unknown}; known: {DECISION_SOURCES}")
        if self.abstentions not in ("as_action", "drop"):
            raise ValueError(f"abstentions must be 'as_action' or 'drop', not {self.abstentions!r}")
        if self.off_policy not in get_args(OffPolicyEstimator):
            raise ValueError(
                f"off_policy must be 'weighted' or 'truncated', not {self.off_policy!r}"
            )
        # JSON gives lists; the dataclass is frozen and hashable.
        object.__setattr__(self, "sources", tuple(dict.fromkeys(self.sources)))


def exploration_ratio(persona: bool, propensity: float | None) -> float:
    """rho = pi_i(choice) / mu(choice) for the behaviour choice logged with a suggestion.

    The target pi_i never draws a persona. The behaviour drew none with probability 1 - epsilon
    (the logged propensity), so a persona-free suggestion has rho = 1 / propensity and a persona
    suggestion rho = 0. Unlogged propensity: on-policy, rho = 1.
    """
    if persona:
        return 0.0
    if propensity is None:
        return 1.0
    if not 0.0 < propensity <= 1.0:
        raise ValueError(f"a propensity is a probability in (0, 1], got {propensity}")
    return 1.0 / propensity


def importance_weights(
    decision_states: Sequence[int],
    executed: Sequence[tuple[int, float]],
    *,
    estimator: OffPolicyEstimator,
    clip: float,
) -> list[float]:
    """Per-decision weights for one conversation's decisions.

    decision_states: the state_seq of each decision. executed: (state_seq, rho) of the
    suggestions that were actually answered (they shaped what the customer saw), before the
    outcome. A decision's return depends on the choices made *after* its state, so its weight is
    the product over executed choices with a later state: with `weighted`, prod rho capped at
    clip (the fit divides by the weights' sum: weighted IS, targets stay in [0, 1]); with
    `truncated`, prod min(1, rho) (Retrace's traces).
    """
    weights = []
    for state in decision_states:
        weight = 1.0
        for later_state, rho in executed:
            if later_state > state:
                weight *= rho if estimator == "weighted" else min(1.0, rho)
        weights.append(min(weight, clip) if estimator == "weighted" else weight)
    return weights


def effective_sample_size(weights: Sequence[float]) -> float:
    """Kish's ESS, (sum w)^2 / sum w^2: how many equally weighted decisions the data is worth."""
    total = sum(weights)
    squares = sum(w * w for w in weights)
    return total * total / squares if squares > 0 else 0.0
