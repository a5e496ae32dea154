"""The pipeline's own config: how an iteration splits its data, gates on Q and deploys.

The learning steps have theirs in workers/learning (ReturnsConfig, QFitConfig, the
improvement configs); this one belongs to the iteration, which is why it lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PipelineConfig:
    """Held-out split, prompts for improvement, the Q gate and the A/B that follows approval."""

    eval_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Share of conversations held out from Q's training to evaluate it (the Q "
            "gate), in (0, 1)."
        },
    )
    max_prompts: int = field(
        default=64,
        metadata={"help": "Logged states (customer's turn) used as improvement prompts, >= 1."},
    )
    rank_floor: float | None = field(
        default=None,
        metadata={
            "help": "The Q gate: the lower end of the 95% interval of the held-out correlation "
            "of Q(s, a) - V(s) with G - V(s) (does Q rank replies?) must lie above this, in "
            "[-1, 1). None: OUTCOMELOOP_Q_RANK_FLOOR."
        },
    )
    ab_weight: float = field(
        default=0.5,
        metadata={
            "help": "Traffic share of the candidate pi_{i+1} in the A/B experiment deploy "
            "starts against pi_i, in (0, 1)."
        },
    )
    check_samples: int = field(
        default=4,
        metadata={
            "help": "Replies sampled from pi_i and from pi_{i+1} at each held-out state for the "
            "candidate check (Q's premise of improvement and the outcome-rate estimates), "
            "0 to skip the check, at most 64."
        },
    )
    check_conversations: int = field(
        default=24,
        metadata={
            "help": "Held-out conversations the candidate check scores (all their decisions), "
            ">= 1: its cost is check_samples x 2 generations per decision."
        },
    )
    override_gate: bool = field(
        default=False,
        metadata={"help": "Improve even if Q fails the gate (an operator's decision)."},
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), not {self.eval_fraction}")
        if self.max_prompts < 1:
            raise ValueError(f"max_prompts must be at least 1, not {self.max_prompts}")
        if self.rank_floor is not None and not -1.0 <= self.rank_floor < 1.0:
            raise ValueError(f"rank_floor must be in [-1, 1) or None, not {self.rank_floor}")
        if not 0 <= self.check_samples <= 64:
            raise ValueError(f"check_samples must be in [0, 64], not {self.check_samples}")
        if self.check_conversations < 1:
            raise ValueError(
                f"check_conversations must be at least 1, not {self.check_conversations}"
            )
        if not 0.0 < self.ab_weight < 1.0:
            raise ValueError(f"ab_weight must be in (0, 1), not {self.ab_weight}")
