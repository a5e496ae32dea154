"""Monte Carlo returns, the slow obvious way (the SQL in the conversation repository computes
the same numbers where the data lives; tests hold the two together)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ReturnsConfig:
    """Which decisions become training data, and how their returns are computed."""

    gamma: float = field(
        default=1.0, metadata={"help": "Discount per business decision, in (0, 1]."}
    )
    arms: Literal["policy", "all"] = field(
        default="policy",
        metadata={
            "help": "policy: only decisions of the policy being improved (on-policy); all: every "
            "arm, with per-decision importance weights from the logged propensities."
        },
    )
    include_unlogged: bool = field(
        default=True,
        metadata={
            "help": "Use decisions with no logged suggestion (imported history, the business "
            "writing on its own): the business's actual message is the action."
        },
    )
    abstentions: Literal["as_action", "business_message", "drop"] = field(
        default="as_action",
        metadata={
            "help": "An abstained suggestion is the action ABSTAIN_MARKER (as_action), or the "
            "business's own message stands in for it, or the decision is left out of Q data "
            "(it still counts in the returns of earlier decisions)."
        },
    )
    importance_clip: float = field(
        default=5.0, metadata={"help": "Upper clip of per-decision importance ratios."}
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
        if self.importance_clip < 1.0:
            raise ValueError(f"importance_clip must be >= 1, got {self.importance_clip}")
        if self.window_days is not None and self.window_days <= 0:
            raise ValueError("window_days must be positive")


def monte_carlo_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """G_t = sum_j gamma^j r_{t+j+1}, where rewards[t] is r_{t+1}, the reward after decision t."""
    returns = []
    for t in range(len(rewards)):
        total = 0.0
        for j in range(t, len(rewards)):
            total += gamma ** (j - t) * rewards[j]
        returns.append(total)
    return returns


def per_decision_is_returns(
    rewards: Sequence[float], ratios: Sequence[float], gamma: float
) -> list[float]:
    """Per-decision importance-sampled returns G_t = r_{t+1} + gamma rho_{t+1} G_{t+1}.

    rho_k = pi(a_k|s_k) / mu(a_k|s_k) corrects the decisions *after* t; the decision at t is the
    action Q(s_t, a_t) is conditioned on, so it needs no ratio.
    """
    returns = [0.0] * len(rewards)
    following = 0.0
    for t in reversed(range(len(rewards))):
        ratio = ratios[t + 1] if t + 1 < len(rewards) else 1.0
        following = rewards[t] + gamma * ratio * following
        returns[t] = following
    return returns
