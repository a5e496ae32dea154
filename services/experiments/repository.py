"""All SQL about experiments, arms and assignments."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from services.conversations.models import Conversation, Message, Outcome, Suggestion
from services.db import newest_first_page
from services.experiments.models import Arm, Assignment, Experiment


def get_experiment(session: Session, *, experiment_id: str) -> Experiment | None:
    return session.get(Experiment, experiment_id)


def running_for_scope(session: Session, *, scope: str) -> Experiment | None:
    return session.scalars(
        select(Experiment).where(Experiment.scope == scope, Experiment.status == "running")
    ).first()


def page_experiments(
    session: Session, *, after: str | None, limit: int
) -> tuple[list[Experiment], bool]:
    return newest_first_page(session, select(Experiment), Experiment, after=after, limit=limit)


def list_experiments(session: Session, *, status: str | None = None) -> Sequence[Experiment]:
    query = select(Experiment).order_by(Experiment.created_at)
    if status is not None:
        query = query.where(Experiment.status == status)
    return session.scalars(query).all()


def get_arm(session: Session, *, arm_id: str) -> Arm | None:
    return session.get(Arm, arm_id)


def get_assignment(session: Session, *, experiment_id: str, unit_id: str) -> Assignment | None:
    return session.get(Assignment, (experiment_id, unit_id))


def add(session: Session, row: Experiment | Arm | Assignment) -> None:
    session.add(row)
    session.flush()


def policies_in_running_experiments(session: Session) -> set[str]:
    rows = session.scalars(
        select(Arm.policy_id).join(Experiment).where(Experiment.status == "running")
    )
    return set(rows)


def arm_outcomes(session: Session, *, experiment_id: str) -> list[dict[str, object]]:
    """Per arm: conversations assigned, ended, and ended with an outcome."""
    has_outcome = (
        select(Outcome.conversation_id).where(Outcome.conversation_id == Conversation.id).exists()
    )
    rows = session.execute(
        select(
            Arm.name,
            Arm.policy_id,
            func.count(Conversation.id),
            func.sum(case((Conversation.status == "closed", 1), else_=0)),
            func.sum(case((has_outcome, 1), else_=0)),
        )
        .select_from(Arm)
        .outerjoin(Conversation, Conversation.arm_id == Arm.id)
        .where(Arm.experiment_id == experiment_id)
        .group_by(Arm.name, Arm.policy_id, Arm.position)
        .order_by(Arm.position)
    )
    return [
        {
            "arm": name,
            "policy": policy,
            "conversations": n,
            "ended": ended or 0,
            "outcomes": outcomes or 0,
        }
        for name, policy, n, ended, outcomes in rows
    ]


def arm_reply_relations(session: Session, *, experiment_id: str) -> list[tuple[str, str, int]]:
    """Per arm and relation (accepted / edited / rejected / abstained): business replies."""
    rows = session.execute(
        select(Arm.name, Message.suggestion_relation, func.count())
        .select_from(Message)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .join(Arm, Arm.id == Conversation.arm_id)
        .where(Arm.experiment_id == experiment_id, Message.suggestion_relation.is_not(None))
        .group_by(Arm.name, Message.suggestion_relation)
    )
    return [(str(arm), str(relation), int(count)) for arm, relation, count in rows]


def arm_units(session: Session, *, experiment_id: str) -> dict[str, int]:
    """Per arm: units (conversations or businesses) assigned to it."""
    rows = session.execute(
        select(Arm.name, func.count(Assignment.unit_id))
        .select_from(Arm)
        .outerjoin(Assignment, Assignment.arm_id == Arm.id)
        .where(Arm.experiment_id == experiment_id)
        .group_by(Arm.name)
    )
    return {str(name): int(count) for name, count in rows}


def arm_suggestions(session: Session, *, experiment_id: str) -> dict[str, tuple[int, float | None]]:
    """Per arm: suggestions made for its conversations and their mean latency (ms)."""
    rows = session.execute(
        select(Arm.name, func.count(Suggestion.id), func.avg(Suggestion.latency_ms))
        .select_from(Suggestion)
        .join(Conversation, Conversation.id == Suggestion.conversation_id)
        .join(Arm, Arm.id == Conversation.arm_id)
        .where(Arm.experiment_id == experiment_id)
        .group_by(Arm.name)
    )
    return {
        str(name): (int(count), None if mean is None else float(mean)) for name, count, mean in rows
    }


def conversation_acceptance(
    session: Session, *, experiment_id: str
) -> dict[str, list[tuple[int, int]]]:
    """Per arm: (accepted, replies) of each conversation with at least one reply to a
    suggestion (the unit of the acceptance guardrail: replies within a conversation are not
    independent)."""
    accepted = func.sum(case((Message.suggestion_relation == "accepted", 1), else_=0))
    rows = session.execute(
        select(Arm.name, Conversation.id, accepted, func.count())
        .select_from(Message)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .join(Arm, Arm.id == Conversation.arm_id)
        .where(Arm.experiment_id == experiment_id, Message.suggestion_relation.is_not(None))
        .group_by(Arm.name, Conversation.id)
    )
    out: dict[str, list[tuple[int, int]]] = {}
    for arm, _, yes, total in rows:
        out.setdefault(str(arm), []).append((int(yes or 0), int(total)))
    return out


def units_assigned_between(
    session: Session, *, experiment_id: str, start: datetime | None, end: datetime | None
) -> int:
    """Units assigned in [start, end) (open ends: no bound)."""
    query = (
        select(func.count())
        .select_from(Assignment)
        .where(Assignment.experiment_id == experiment_id)
    )
    if start is not None:
        query = query.where(Assignment.created_at >= start)
    if end is not None:
        query = query.where(Assignment.created_at < end)
    return int(session.scalar(query) or 0)
