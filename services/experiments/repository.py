"""All SQL about experiments, arms and assignments."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.experiments.models import Arm, Assignment, Experiment


def get_experiment(session: Session, *, experiment_id: str) -> Experiment | None:
    return session.get(Experiment, experiment_id)


def running_for_scope(session: Session, *, scope: str) -> Experiment | None:
    return session.scalars(
        select(Experiment).where(Experiment.scope == scope, Experiment.status == "running")
    ).first()


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
