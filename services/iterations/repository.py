"""All SQL about iterations, their steps and events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from services.db import newest_first_page
from services.iterations.models import (
    ACTIVE,
    Iteration,
    IterationEvent,
    IterationStatus,
    IterationStep,
)


def get_iteration(session: Session, *, iteration_id: str) -> Iteration | None:
    return session.get(Iteration, iteration_id)


def lock_iteration(session: Session, *, iteration_id: str) -> Iteration | None:
    """The iteration's row, locked for this transaction (portable no-op UPDATE, see the log)."""
    locked = session.execute(
        update(Iteration)
        .where(Iteration.id == iteration_id)
        .values(progress=Iteration.progress)
        .returning(Iteration.id)
        .execution_options(synchronize_session=False)
    ).first()
    if locked is None:
        return None
    return session.get(Iteration, iteration_id, populate_existing=True)


def page_iterations(
    session: Session, *, after: str | None, limit: int
) -> tuple[list[Iteration], bool]:
    return newest_first_page(session, select(Iteration), Iteration, after=after, limit=limit)


def list_iterations(session: Session, *, limit: int = 100) -> Sequence[Iteration]:
    return session.scalars(
        select(Iteration).order_by(Iteration.created_at.desc()).limit(limit)
    ).all()


def active_iterations(session: Session) -> Sequence[Iteration]:
    return session.scalars(select(Iteration).where(Iteration.status.in_(ACTIVE))).all()


def queued_before(session: Session, *, cutoff: datetime) -> Sequence[Iteration]:
    return session.scalars(
        select(Iteration).where(
            Iteration.status == IterationStatus.QUEUED.value, Iteration.updated_at < cutoff
        )
    ).all()


def latest_iteration(session: Session) -> Iteration | None:
    return session.scalars(select(Iteration).order_by(Iteration.created_at.desc()).limit(1)).first()


def get_step(session: Session, *, iteration_id: str, step: str) -> IterationStep | None:
    return session.scalars(
        select(IterationStep).where(
            IterationStep.iteration_id == iteration_id, IterationStep.step == step
        )
    ).first()


def add(session: Session, row: Iteration | IterationStep | IterationEvent) -> None:
    session.add(row)
    session.flush()


def next_event_seq(session: Session, *, iteration_id: str) -> int:
    current = session.scalar(
        select(func.max(IterationEvent.seq)).where(IterationEvent.iteration_id == iteration_id)
    )
    return int(current or 0) + 1


def page_events(
    session: Session, *, iteration_id: str, after: int | None, limit: int
) -> tuple[list[IterationEvent], bool]:
    """An iteration's events in order: up to limit with seq above `after`, and whether more
    follow."""
    query = (
        select(IterationEvent)
        .where(IterationEvent.iteration_id == iteration_id)
        .order_by(IterationEvent.seq)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(IterationEvent.seq > after)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def status_counts(session: Session) -> dict[str, int]:
    """Iterations per status."""
    rows = session.execute(select(Iteration.status, func.count()).group_by(Iteration.status))
    return {str(status): int(count) for status, count in rows}


def latest_step_durations(session: Session) -> dict[str, float]:
    """Per step: seconds its most recently finished run took."""
    latest = (
        select(IterationStep.step, func.max(IterationStep.finished_at).label("finished"))
        .where(IterationStep.status == "done", IterationStep.finished_at.is_not(None))
        .group_by(IterationStep.step)
        .subquery()
    )
    rows = session.execute(
        select(IterationStep.step, IterationStep.started_at, IterationStep.finished_at).join(
            latest,
            (IterationStep.step == latest.c.step)
            & (IterationStep.finished_at == latest.c.finished),
        )
    )
    return {
        str(step): (finished - started).total_seconds()
        for step, started, finished in rows
        if started is not None and finished is not None
    }


def latest_metrics(session: Session) -> dict[str, Any]:
    """The metrics of the most recent of the last 20 iterations that has any."""
    rows = session.scalars(select(Iteration).order_by(Iteration.created_at.desc()).limit(20))
    return next((dict(row.metrics) for row in rows if row.metrics), {})
