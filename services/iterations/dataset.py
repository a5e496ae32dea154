"""The decisions an iteration learns from, built from the log: one code path for the pipeline's
returns step and `outcomeloop data decisions`.

The database computes each decision's reward and Monte Carlo return
(conversations.repository.decision_returns, rules in workers/learning/returns.py); this module
names each decision's source, its state and action, applies the iteration's choice of sources,
and weights exploration data off-policy. Q^{pi_i} is by default fitted on pi_i's own decisions
(`policy`) and its exploration decisions with bounded importance weights (`exploration`);
imported history, business turns with no suggestion and other arms' decisions are separate
sources an iteration opts into.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from services.conversations import repository as conversations
from services.conversations.models import Conversation, Relation, Source, Suggestion
from services.policies.prompt import ABSTAIN_MARKER, Turn, system_prompt
from services.tenants import repository as tenants
from workers.learning.examples import StepExample
from workers.learning.preferences import EditPair, LoggedConversation
from workers.learning.returns import (
    DECISION_SOURCES,
    ReturnsConfig,
    effective_sample_size,
    exploration_ratio,
    importance_weights,
)


@dataclass(frozen=True)
class Decision:
    """One decision of the log, as an iteration sees it (also the `data decisions` record)."""

    conversation_id: str
    decision_index: int  # order within the conversation
    turn: int  # business turns before its state
    n_turns: int  # business turns of the conversation, up to the absorbing outcome
    state: tuple[Turn, ...]
    action: str | None  # None: the policy abstained and abstentions are dropped
    source: str  # one of DECISION_SOURCES, or "backend_error" (an abstention forced by a failure)
    reward: float
    ret: float
    weight: float
    outcome: int  # the conversation reached an outcome
    system: str
    suggestion_id: str | None
    used: bool  # selected by the config's sources and kept (action, weight > 0)
    excluded: str | None = None  # why not used
    # pi_i / mu of the logged choice (policy and exploration sources; 0 for a persona), else None
    behaviour_ratio: float | None = None

    def as_record(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "decision_index": self.decision_index,
            "state": [{"role": t.role, "text": t.text} for t in self.state],
            "action": self.action,
            "source": self.source,
            "reward": self.reward,
            "return": self.ret,
            "weight": self.weight,
            "outcome": self.outcome,
            "suggestion_id": self.suggestion_id,
            "used": self.used,
            "excluded": self.excluded,
        }

    def example(self) -> StepExample:
        assert self.action is not None
        return StepExample(
            conversation_id=self.conversation_id,
            step=self.turn,
            n_steps=self.n_turns,
            state=self.state,
            action=self.action,
            ret=self.ret,
            outcome=self.outcome,
            weight=self.weight,
            system=self.system,
        )


@dataclass
class DatasetStats:
    """Counts of a data window: per source, what exists and what is used; why the rest is not."""

    conversations: int = 0
    decisions: int = 0
    used: int = 0
    with_outcome: int = 0
    mean_return: float = 0.0
    effective_sample_size: float = 0.0
    weight_max: float = 0.0
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversations": self.conversations,
            "decisions": self.decisions,
            "used": self.used,
            "with_outcome": self.with_outcome,
            "mean_return": round(self.mean_return, 6),
            "effective_sample_size": round(self.effective_sample_size, 3),
            "weight_max": round(self.weight_max, 6),
            "by_source": self.by_source,
            "excluded": self.excluded,
        }

    def flat(self) -> dict[str, float | int]:
        """Scalars for an iteration's metrics: data_used, data_policy, data_ess, ..."""
        out: dict[str, float | int] = {
            "data_conversations": self.conversations,
            "data_decisions": self.decisions,
            "data_used": self.used,
            "data_ess": round(self.effective_sample_size, 3),
            "data_weight_max": round(self.weight_max, 6),
        }
        for source, counts in self.by_source.items():
            out[f"data_{source}"] = counts.get("used", 0)
            out[f"data_{source}_available"] = counts.get("available", 0)
        for reason, count in self.excluded.items():
            out[f"data_excluded_{reason}"] = count
        return out


def decision_source(
    suggestion: Suggestion | None, conversation: Conversation, policy_id: str
) -> str | None:
    """The named source of a decision; None for a suggestion that is no policy's decision (the
    API abstained because the generation backend failed)."""
    if suggestion is None:
        return "imported" if conversation.source == Source.IMPORT.value else "unlogged"
    if suggestion.source == Source.IMPORT.value or suggestion.policy_version is None:
        return "imported"  # never pi_i's, whatever policy the file names
    if (suggestion.sampling_params or {}).get("fallback"):
        return None
    if suggestion.policy_version != policy_id:
        return "other_arms"
    return "exploration" if suggestion.persona else "policy"


def ended_conversations(session: Session, *, config: ReturnsConfig, cutoff: datetime) -> list[str]:
    created_after = cutoff - timedelta(days=config.window_days) if config.window_days else None
    return conversations.ended_conversation_ids(
        session,
        closed_before=cutoff,
        created_after=created_after,
        business_id=config.business_id,
        limit=config.max_conversations,
    )


def iter_decisions(
    session: Session,
    *,
    config: ReturnsConfig,
    policy_id: str,
    cutoff: datetime,
    stats: DatasetStats,
) -> Iterator[Decision]:
    """Every decision of the window's ended conversations, used or not, counted into stats."""
    ids = ended_conversations(session, config=config, cutoff=cutoff)
    stats.conversations = len(ids)
    stats.by_source = {s: {"available": 0, "used": 0} for s in DECISION_SOURCES}
    excluded: Counter[str] = Counter()
    weights: list[float] = []
    returns: list[float] = []
    systems: dict[str, str] = {}
    chunk = 200
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        rows = conversations.decision_returns(session, conversation_ids=part, gamma=config.gamma)
        by_conversation: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_conversation.setdefault(str(row["conversation_id"]), []).append(row)
        for conversation in conversations.iter_conversations_by_ids(session, part):
            system = systems.get(conversation.business_id)
            if system is None:
                system = systems[conversation.business_id] = _system(session, conversation)
            for decision in _conversation_decisions(
                conversation, by_conversation.get(conversation.id, []), config, policy_id, system
            ):
                stats.decisions += 1
                if decision.excluded == "after_outcome" or decision.excluded == "backend_error":
                    excluded[decision.excluded] += 1
                    yield decision
                    continue
                stats.by_source[decision.source]["available"] += 1
                if decision.used:
                    stats.by_source[decision.source]["used"] += 1
                    stats.used += 1
                    stats.with_outcome += decision.outcome
                    weights.append(decision.weight)
                    returns.append(decision.ret)
                elif decision.excluded is not None:
                    excluded[decision.excluded] += 1
                yield decision
    stats.excluded = dict(sorted(excluded.items()))
    stats.effective_sample_size = effective_sample_size(weights)
    stats.weight_max = max(weights, default=0.0)
    total = sum(weights)
    stats.mean_return = (
        sum(w * g for w, g in zip(weights, returns, strict=True)) / total if total else 0.0
    )


def build_examples(
    session: Session, *, config: ReturnsConfig, policy_id: str, cutoff: datetime
) -> tuple[list[StepExample], DatasetStats]:
    """The training examples of an iteration of `policy_id` (pi_i) on data ended by `cutoff`."""
    examples, stats, _ = build_dataset(session, config=config, policy_id=policy_id, cutoff=cutoff)
    return examples, stats


def build_dataset(
    session: Session, *, config: ReturnsConfig, policy_id: str, cutoff: datetime
) -> tuple[list[StepExample], DatasetStats, list[Decision]]:
    """build_examples, and every decision of the window (used or not)."""
    stats = DatasetStats()
    decisions = list(
        iter_decisions(session, config=config, policy_id=policy_id, cutoff=cutoff, stats=stats)
    )
    return [d.example() for d in decisions if d.used], stats, decisions


def _system(session: Session, conversation: Conversation) -> str:
    business = tenants.get_business(session, business_id=conversation.business_id)
    return system_prompt(
        business_name=business.name if business else conversation.business_id,
        business_prompt=business.system_prompt if business else None,
        persona_instruction=None,
    )


def _conversation_decisions(
    conversation: Conversation,
    rows: list[dict[str, Any]],
    config: ReturnsConfig,
    policy_id: str,
    system: str,
) -> Iterator[Decision]:
    suggestions = {s.id: s for s in conversation.suggestions}
    answered = {m.suggestion_id for m in conversation.messages if m.suggestion_id}
    outcome = 1 if conversation.outcomes else 0
    kept = [r for r in rows if not r["after_outcome"]]
    n_turns = max((int(r["turn"]) + 1 for r in kept), default=0)
    # The choices that shaped what the customer saw, before the outcome: pi_i's answered
    # suggestions, with the ratio pi_i / mu of their exploration draw.
    executed = [
        (int(r["state_seq"]), _ratio(suggestions[str(r["suggestion_id"])]))
        for r in kept
        if r["suggestion_id"] is not None
        and str(r["suggestion_id"]) in answered
        and decision_source(suggestions[str(r["suggestion_id"])], conversation, policy_id)
        in ("policy", "exploration")
    ]
    weights = importance_weights(
        [int(r["state_seq"]) for r in rows],
        executed,
        estimator=config.off_policy,
        clip=config.importance_clip,
    )
    for index, (row, weight) in enumerate(zip(rows, weights, strict=True)):
        suggestion = suggestions[str(row["suggestion_id"])] if row["suggestion_id"] else None
        source = decision_source(suggestion, conversation, policy_id)
        state_seq = int(row["state_seq"])
        state = tuple(Turn(m.role, m.text) for m in conversation.messages if m.seq <= state_seq)
        action: str | None
        if suggestion is None:
            action = _turn_text(conversation, str(row["message_id"]))
        elif suggestion.text is None:
            action = ABSTAIN_MARKER if config.abstentions == "as_action" else None
        else:
            action = suggestion.text
        if source not in ("policy", "exploration"):
            weight = 1.0  # no correction is possible without rescoring: documented as such
        excluded = None
        if source is None:
            excluded = "backend_error"
        elif row["after_outcome"]:
            excluded = "after_outcome"
        elif source not in config.sources:
            excluded = f"source_{source}"
        elif action is None:
            excluded = "abstention_dropped"
        elif weight <= 0.0:
            excluded = "zero_weight"
        yield Decision(
            conversation_id=conversation.id,
            decision_index=index,
            turn=int(row["turn"]),
            n_turns=n_turns,
            state=state,
            action=action,
            source=source or "backend_error",
            reward=float(row["reward"]),
            ret=float(row["ret"]),
            weight=weight,
            outcome=outcome,
            system=system,
            suggestion_id=suggestion.id if suggestion else None,
            used=excluded is None,
            excluded=excluded,
            behaviour_ratio=(
                _ratio(suggestion)
                if suggestion is not None and source in ("policy", "exploration")
                else None
            ),
        )


def _ratio(suggestion: Suggestion) -> float:
    return exploration_ratio(bool(suggestion.persona), suggestion.propensity)


def _turn_text(conversation: Conversation, first_message_id: str) -> str:
    """The business turn starting at this message: its consecutive business messages, joined."""
    texts: list[str] = []
    started = False
    for message in conversation.messages:
        if message.id == first_message_id:
            started = True
        elif started and message.role != "business":
            break
        if started:
            texts.append(message.text)
    return "\n".join(texts)


def check_trajectories(decisions: Sequence[Decision]) -> list[dict[str, Any]]:
    """The held-out conversations' decisions as the candidate check reads them: per
    conversation, in order, the decisions of pi_i's serving (policy and exploration sources,
    before the outcome, with an action), each with its reward and behaviour ratio pi_i / mu.

    A dropped decision's reward (e.g. an outcome on a business turn with no suggestion) goes to
    the kept decision before it (or the first kept one), so that a conversation's rewards still
    sum to its outcome.
    """
    by_conversation: dict[str, list[Decision]] = {}
    for decision in decisions:
        by_conversation.setdefault(decision.conversation_id, []).append(decision)
    records: list[dict[str, Any]] = []
    for conversation_id, members in sorted(by_conversation.items()):
        members = sorted(members, key=lambda d: d.decision_index)
        kept = [
            d
            for d in members
            if d.behaviour_ratio is not None
            and d.action is not None
            and d.excluded not in ("after_outcome", "backend_error")
        ]
        if not kept:
            continue
        rewards = {d.decision_index: d.reward for d in kept}
        for d in members:
            if d.decision_index in rewards or d.excluded == "after_outcome":
                continue
            before = [k for k in kept if k.decision_index < d.decision_index]
            target = before[-1] if before else kept[0]
            rewards[target.decision_index] += d.reward
        records.extend(
            {
                "conversation_id": conversation_id,
                "index": d.decision_index,
                "system": d.system,
                "state": [[t.role, t.text] for t in d.state],
                "action": d.action,
                "reward": rewards[d.decision_index],
                "behaviour_ratio": d.behaviour_ratio,
            }
            for d in kept
        )
    return records


@dataclass
class PreferenceData:
    """The offline steps' data of a window: every ended conversation (DMPO pairs them) and
    every suggestion the business edited or replaced (DPO), with counts."""

    conversations: list[LoggedConversation] = field(default_factory=list)
    edits: list[EditPair] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        relations = Counter(e.relation for e in self.edits)
        return {
            "conversations": len(self.conversations),
            "with_outcome": sum(c.outcome for c in self.conversations),
            "edits_edited": relations.get(Relation.EDITED.value, 0),
            "edits_rejected": relations.get(Relation.REJECTED.value, 0),
        }


def preference_data(session: Session, *, config: ReturnsConfig, cutoff: datetime) -> PreferenceData:
    """The window's conversations as trajectories (turns up to the outcome, what the business
    sent) and its edited or rejected suggestions before the outcome."""
    data = PreferenceData()
    systems: dict[str, str] = {}
    ids = ended_conversations(session, config=config, cutoff=cutoff)
    for start in range(0, len(ids), 200):
        for conversation in conversations.iter_conversations_by_ids(
            session, ids[start : start + 200]
        ):
            system = systems.get(conversation.business_id)
            if system is None:
                system = systems[conversation.business_id] = _system(session, conversation)
            data.conversations.append(_logged_conversation(conversation, system))
            data.edits.extend(_edits(conversation, system))
    return data


def _outcome_seq(conversation: Conversation) -> int | None:
    return min((o.seq for o in conversation.outcomes), default=None)


def _logged_conversation(conversation: Conversation, system: str) -> LoggedConversation:
    """Consecutive messages of one side merged into a turn; cut at the outcome (the episode
    ends there)."""
    outcome_seq = _outcome_seq(conversation)
    turns: list[Turn] = []
    for message in conversation.messages:
        if outcome_seq is not None and message.seq > outcome_seq:
            break  # what follows the outcome is no part of the episode
        if turns and turns[-1].role == message.role:
            turns[-1] = Turn(message.role, turns[-1].text + "\n" + message.text)
        else:
            turns.append(Turn(message.role, message.text))
    return LoggedConversation(
        conversation_id=conversation.id,
        group=conversation.business_id,
        system=system,
        turns=tuple(turns),
        outcome=1 if outcome_seq is not None else 0,
    )


def _edits(conversation: Conversation, system: str) -> Iterator[EditPair]:
    outcome_seq = _outcome_seq(conversation)
    suggestions = {s.id: s for s in conversation.suggestions}
    for message in conversation.messages:
        relation = message.suggestion_relation
        if message.suggestion_id is None or relation not in (
            Relation.EDITED.value,
            Relation.REJECTED.value,
        ):
            continue
        suggestion = suggestions.get(message.suggestion_id)
        if suggestion is None or suggestion.text is None:
            continue
        if outcome_seq is not None and suggestion.state_seq > outcome_seq:
            continue  # after the outcome: not part of the episode
        yield EditPair(
            conversation_id=conversation.id,
            system=system,
            state=tuple(
                Turn(m.role, m.text) for m in conversation.messages if m.seq <= suggestion.state_seq
            ),
            chosen=_turn_text(conversation, message.id),
            rejected=suggestion.text,
            relation=relation,
            outcome=1 if outcome_seq is not None else 0,
        )
