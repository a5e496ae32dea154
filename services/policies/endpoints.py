"""Operator endpoints for the policy registry."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.deps import OperatorDep, SessionDep
from services.pages import AfterQuery, LimitQuery, Page, unknown_cursor
from services.policies import repository, schemas, service
from services.policies.models import PolicyStatus

router = APIRouter(prefix="/v1/policies", tags=["operator"])


@router.get("", response_model=Page[schemas.PolicyOut])
def list_policies(
    session: SessionDep,
    _: OperatorDep,
    status_filter: PolicyStatus | None = None,
    after: AfterQuery = None,
    limit: LimitQuery = 100,
) -> Page[schemas.PolicyOut]:
    """Policies, newest first."""
    status = status_filter.value if status_filter else None
    try:
        rows, has_more = repository.page_policies(session, status=status, after=after, limit=limit)
    except LookupError:
        raise unknown_cursor("policy", str(after)) from None
    return Page(data=[schemas.PolicyOut.model_validate(p) for p in rows], has_more=has_more)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.PolicyOut)
def register_policy(
    body: schemas.PolicyCreate, session: SessionDep, _: OperatorDep
) -> schemas.PolicyOut:
    policy = service.register_policy(
        session,
        policy_id=body.id,
        base_model=body.base_model,
        adapter_uri=body.adapter_uri,
        parent_id=body.parent_id,
        status=body.status,
        config=body.config,
        description=body.description,
    )
    session.commit()
    return schemas.PolicyOut.model_validate(policy)


@router.get("/{policy_id}", response_model=schemas.PolicyOut)
def get_policy(policy_id: str, session: SessionDep, _: OperatorDep) -> schemas.PolicyOut:
    return schemas.PolicyOut.model_validate(service.get_policy(session, policy_id=policy_id))


def _transition(policy_id: str, to: PolicyStatus, session: SessionDep) -> schemas.PolicyOut:
    policy = service.transition(session, policy_id=policy_id, to=to)
    session.commit()
    return schemas.PolicyOut.model_validate(policy)


@router.post("/{policy_id}/approve", response_model=schemas.PolicyOut)
def approve(policy_id: str, session: SessionDep, _: OperatorDep) -> schemas.PolicyOut:
    return _transition(policy_id, PolicyStatus.APPROVED, session)


@router.post("/{policy_id}/reject", response_model=schemas.PolicyOut)
def reject(policy_id: str, session: SessionDep, _: OperatorDep) -> schemas.PolicyOut:
    return _transition(policy_id, PolicyStatus.REJECTED, session)


@router.post("/{policy_id}/retire", response_model=schemas.PolicyOut)
def retire(policy_id: str, session: SessionDep, _: OperatorDep) -> schemas.PolicyOut:
    return _transition(policy_id, PolicyStatus.RETIRED, session)
