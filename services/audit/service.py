"""Recording decisions in the same transaction as the decision itself, and reading them back."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from services.audit import repository
from services.audit.models import AuditEvent

CLI_ACTOR = "cli"  # a local operator at the command line (no API key)
SYSTEM_ACTOR = "system"  # the demo, a pipeline step


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    event = AuditEvent(
        action=action, actor=actor, subject_type=subject_type, subject_id=subject_id, data=data
    )
    repository.add(session, event)
    return event


def list_events(
    session: Session, *, after: int | None, limit: int
) -> tuple[list[AuditEvent], bool]:
    """A page of events after the cursor, and whether more follow."""
    rows = list(repository.page(session, after=after, limit=limit + 1))
    return rows[:limit], len(rows) > limit
