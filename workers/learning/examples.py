"""What the learning steps consume: one example per business decision, with its return."""

from __future__ import annotations

from dataclasses import dataclass

from workers.learning.chat import Turn


@dataclass(frozen=True)
class StepExample:
    """One (state, action) decision of a conversation and what followed it.

    state: the messages before the decision (customer and business turns, in order).
    action: the suggestion the policy made; where none was logged, the business's actual
        message (imported history, or the business writing on its own); ABSTAIN_MARKER when
        the policy abstained.
    ret: the Monte Carlo return G = sum_j gamma^j r_{t+j+1} from this decision on.
    outcome: 1 if the conversation reached the outcome at all (for AUC / calibration).
    weight: importance weight (1.0 on-policy), already clipped.
    """

    conversation_id: str
    step: int
    n_steps: int
    state: tuple[Turn, ...]
    action: str
    ret: float
    outcome: int
    weight: float = 1.0
    system: str | None = None
