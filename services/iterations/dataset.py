"""Build the training examples of an iteration from the log: one StepExample per decision.

The database computes rewards and Monte Carlo returns (conversations.repository
.decision_returns); this module picks the data window, the action of each decision and, for
data from several arms, per-decision importance-sampled returns from the logged propensities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from services.conversations import repository as conversations
from services.conversations.models import Conversation, Suggestion
from services.policies.prompt import ABSTAIN_MARKER, Turn, system_prompt
from services.tenants import repository as tenants
from workers.learning.examples import StepExample
from workers.learning.returns import ReturnsConfig, per_decision_is_returns


@dataclass
class DatasetStats:
    conversations: int = 0
    decisions: int = 0
    examples: int = 0
    with_outcome: int = 0
    logged: int = 0
    unlogged: int = 0
    abstained: int = 0
    off_policy: int = 0
    mean_return: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _importance_ratio(suggestion: Suggestion | None, clip: float) -> float:
    """rho = pi_i(choice) / mu(choice) for the behaviour choices logged with a suggestion.

    The target is pi_i without exploration: it never draws a persona. A persona-free choice
    had probability 1 - epsilon under the behaviour (logged as its propensity), so rho =
    1 / propensity; a persona choice has rho = 0, which truncates the corrected return there.
    Differences between arms' policies are not corrected (that needs rescoring the text
    under pi_i, not logged): such decisions count with rho = 1.
    """
    if suggestion is None or suggestion.propensity is None:
        return 1.0
    if suggestion.persona:
        return 0.0
    return min(clip, 1.0 / max(suggestion.propensity, 1e-9))


def build_examples(
    session: Session,
    *,
    config: ReturnsConfig,
    policy_id: str | None,
    cutoff: datetime,
) -> tuple[list[StepExample], DatasetStats]:
    """Examples from conversations ended by `cutoff` (the window and filters of `config`)."""
    created_after = cutoff - timedelta(days=config.window_days) if config.window_days else None
    ids = conversations.ended_conversation_ids(
        session,
        closed_before=cutoff,
        created_after=created_after,
        business_id=config.business_id,
        limit=config.max_conversations,
    )
    stats = DatasetStats(conversations=len(ids))
    rows = conversations.decision_returns(session, conversation_ids=ids, gamma=config.gamma)
    by_conversation: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_conversation.setdefault(str(row["conversation_id"]), []).append(row)
    systems: dict[str, str] = {}
    examples: list[StepExample] = []
    skipped: dict[str, int] = {}
    for conversation in conversations.iter_conversations_by_ids(session, ids):
        decisions = by_conversation.get(conversation.id, [])
        if not decisions:
            continue
        examples.extend(
            _conversation_examples(
                session, conversation, decisions, config, policy_id, systems, stats, skipped
            )
        )
    stats.examples = len(examples)
    stats.skipped = skipped
    stats.mean_return = sum(e.ret for e in examples) / len(examples) if examples else 0.0
    return examples, stats


def _conversation_examples(
    session: Session,
    conversation: Conversation,
    decisions: list[dict[str, Any]],
    config: ReturnsConfig,
    policy_id: str | None,
    systems: dict[str, str],
    stats: DatasetStats,
    skipped: dict[str, int],
) -> list[StepExample]:
    if conversation.business_id not in systems:
        business = tenants.get_business(session, business_id=conversation.business_id)
        systems[conversation.business_id] = system_prompt(
            business_name=business.name if business else conversation.business_id,
            business_prompt=business.system_prompt if business else None,
            persona_instruction=None,
        )
    suggestions = {s.id: s for s in conversation.suggestions}
    messages = {m.id: m for m in conversation.messages}
    outcome = 1 if conversation.outcomes else 0
    linked = [
        suggestions.get(str(d["suggestion_id"])) if d["suggestion_id"] else None for d in decisions
    ]
    returns = [float(d["ret"]) for d in decisions]
    if config.arms == "all":
        ratios = [_importance_ratio(s, config.importance_clip) for s in linked]
        returns = per_decision_is_returns(
            [float(d["reward"]) for d in decisions], ratios, config.gamma
        )
    out: list[StepExample] = []
    n_steps = len(decisions)
    for decision, suggestion, ret in zip(decisions, linked, returns, strict=True):
        stats.decisions += 1
        sent = messages[str(decision["message_id"])]
        if suggestion is None:
            if not config.include_unlogged:
                skipped["unlogged"] = skipped.get("unlogged", 0) + 1
                continue
            action, kind = sent.text, "unlogged"
        elif suggestion.text is None:
            if config.abstentions == "drop":
                skipped["abstained"] = skipped.get("abstained", 0) + 1
                continue
            action = ABSTAIN_MARKER if config.abstentions == "as_action" else sent.text
            kind = "abstained"
        else:
            action, kind = suggestion.text, "logged"
        if suggestion is not None and suggestion.policy_version not in (None, policy_id):
            if config.arms == "policy":
                skipped["other_policy"] = skipped.get("other_policy", 0) + 1
                continue
            stats.off_policy += 1
        setattr(stats, kind, getattr(stats, kind) + 1)
        stats.with_outcome += outcome
        state = tuple(Turn(m.role, m.text) for m in conversation.messages if m.seq < sent.seq)
        out.append(
            StepExample(
                conversation_id=conversation.id,
                step=int(decision["step"]),
                n_steps=n_steps,
                state=state,
                action=action,
                ret=ret,
                outcome=outcome,
                system=systems[conversation.business_id],
            )
        )
    return out
