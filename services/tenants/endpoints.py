"""Operator endpoints for businesses."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from services.deps import OperatorDep, SessionDep
from services.errors import Conflict
from services.pages import AfterQuery, LimitQuery, Page, unknown_cursor
from services.tenants import repository, schemas
from services.tenants.service import ensure_business, revoke_api_key

router = APIRouter(prefix="/v1/businesses", tags=["operator"])


@router.get("", response_model=Page[schemas.BusinessOut])
def list_businesses(
    session: SessionDep, _: OperatorDep, after: AfterQuery = None, limit: LimitQuery = 100
) -> Page[schemas.BusinessOut]:
    """Businesses, newest first."""
    try:
        rows, has_more = repository.page_businesses(session, after=after, limit=limit)
    except LookupError:
        raise unknown_cursor("business", str(after)) from None
    return Page(data=[schemas.BusinessOut.model_validate(b) for b in rows], has_more=has_more)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.BusinessOut,
    responses={200: {"model": schemas.BusinessOut, "description": "It existed: returned as is."}},
)
def create_business(
    body: schemas.BusinessCreate, session: SessionDep, _: OperatorDep, response: Response
) -> schemas.BusinessOut:
    business, created = ensure_business(session, business_id=body.id, name=body.name)
    if not created and (body.name not in (None, business.name)):
        raise Conflict(f"business {body.id} already exists with name {business.name!r}")
    if created and body.system_prompt is not None:
        business.system_prompt = body.system_prompt
    session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
    return schemas.BusinessOut.model_validate(business)


keys_router = APIRouter(prefix="/v1/keys", tags=["operator"])


@keys_router.get("", response_model=Page[schemas.ApiKeyOut])
def list_keys(
    session: SessionDep,
    _: OperatorDep,
    business_id: str | None = None,
    after: AfterQuery = None,
    limit: LimitQuery = 100,
) -> Page[schemas.ApiKeyOut]:
    """API keys, newest first (never the keys themselves), optionally of one business."""
    try:
        rows, has_more = repository.page_api_keys(
            session, business_id=business_id, after=after, limit=limit
        )
    except LookupError:
        raise unknown_cursor("API key", str(after)) from None
    return Page(data=[schemas.ApiKeyOut.model_validate(k) for k in rows], has_more=has_more)


@keys_router.post("/{key_id}/revoke", response_model=schemas.ApiKeyOut)
def revoke_key(key_id: str, session: SessionDep, operator: OperatorDep) -> schemas.ApiKeyOut:
    """Revoke a key: every later request with it is a 401."""
    key = revoke_api_key(session, key_id=key_id, actor=operator.key_id)
    session.commit()
    return schemas.ApiKeyOut.model_validate(key)
