"""All SQL about policies."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.db import newest_first_page
from services.policies.models import Policy


def get_policy(session: Session, *, policy_id: str) -> Policy | None:
    return session.get(Policy, policy_id)


def page_policies(
    session: Session, *, status: str | None, after: str | None, limit: int
) -> tuple[list[Policy], bool]:
    query = select(Policy)
    if status is not None:
        query = query.where(Policy.status == status)
    return newest_first_page(session, query, Policy, after=after, limit=limit)


def list_policies(session: Session, *, status: str | None = None) -> Sequence[Policy]:
    query = select(Policy).order_by(Policy.created_at, Policy.id)
    if status is not None:
        query = query.where(Policy.status == status)
    return session.scalars(query).all()


def add_policy(session: Session, policy: Policy) -> Policy:
    session.add(policy)
    session.flush()
    return policy
