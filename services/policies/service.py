"""Registering policies and moving them through their life cycle."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.orm import Session

from services.db import utcnow
from services.errors import Conflict, Invalid, NotFound
from services.policies import repository
from services.policies.models import ALLOWED_TRANSITIONS, Policy, PolicyStatus

_POLICY_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def register_policy(
    session: Session,
    *,
    policy_id: str,
    base_model: str,
    adapter_uri: str,
    parent_id: str | None = None,
    iteration_id: str | None = None,
    status: PolicyStatus = PolicyStatus.CANDIDATE,
    config: dict[str, Any] | None = None,
    description: str | None = None,
) -> Policy:
    """Register a policy version; the same id with the same weights is a no-op."""
    if not _POLICY_ID.match(policy_id):
        raise Invalid(f"policy id {policy_id!r} must be 1-64 of a-z, 0-9, '.', '-', '_'")
    existing = repository.get_policy(session, policy_id=policy_id)
    if existing is not None:
        if (existing.base_model, existing.adapter_uri) != (base_model, adapter_uri):
            raise Conflict(
                f"policy {policy_id} is already registered with other weights; "
                "policy ids are versions and are never reused"
            )
        return existing
    if parent_id is not None:
        parent = repository.get_policy(session, policy_id=parent_id)
        if parent is None:
            raise Invalid(f"parent policy {parent_id} is not registered")
        if parent.base_model != base_model:
            raise Invalid(
                f"policy {policy_id} must share its parent's base model {parent.base_model!r}: "
                "every arm is an adapter on one base"
            )
    return repository.add_policy(
        session,
        Policy(
            id=policy_id,
            base_model=base_model,
            adapter_uri=adapter_uri,
            parent_id=parent_id,
            iteration_id=iteration_id,
            status=status.value,
            config=config,
            description=description,
        ),
    )


def get_policy(session: Session, *, policy_id: str) -> Policy:
    policy = repository.get_policy(session, policy_id=policy_id)
    if policy is None:
        raise NotFound(f"policy {policy_id} not found")
    return policy


def transition(session: Session, *, policy_id: str, to: PolicyStatus) -> Policy:
    policy = get_policy(session, policy_id=policy_id)
    current = PolicyStatus(policy.status)
    if to is current:
        return policy
    if to not in ALLOWED_TRANSITIONS[current]:
        raise Conflict(f"policy {policy_id} is {current.value}; it cannot become {to.value}")
    policy.status = to.value
    policy.updated_at = utcnow()
    session.flush()
    return policy


def lineage(session: Session, *, policy_id: str) -> list[Policy]:
    """The policy and its ancestors, newest first."""
    chain = [get_policy(session, policy_id=policy_id)]
    while chain[-1].parent_id is not None:
        chain.append(get_policy(session, policy_id=chain[-1].parent_id))
    return chain
