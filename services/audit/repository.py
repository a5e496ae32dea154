"""All SQL about the audit trail."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.audit.models import AuditEvent


def add(session: Session, event: AuditEvent) -> None:
    session.add(event)
    session.flush()


def page(session: Session, *, after: int | None, limit: int) -> Sequence[AuditEvent]:
    """Up to limit events with an id above `after`, oldest first."""
    query = select(AuditEvent).order_by(AuditEvent.id).limit(limit)
    if after is not None:
        query = query.where(AuditEvent.id > after)
    return session.scalars(query).all()


def action_counts(session: Session) -> dict[str, int]:
    """Decisions recorded, per action."""
    rows = session.execute(select(AuditEvent.action, func.count()).group_by(AuditEvent.action))
    return {str(action): int(count) for action, count in rows}


def events_of(session: Session, *, subject_id: str, actions: Sequence[str]) -> Sequence[AuditEvent]:
    """A subject's events of the given actions, oldest first."""
    return session.scalars(
        select(AuditEvent)
        .where(AuditEvent.subject_id == subject_id, AuditEvent.action.in_(list(actions)))
        .order_by(AuditEvent.id)
    ).all()
