"""Operator endpoints for businesses."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from services.deps import OperatorDep, SessionDep
from services.errors import Conflict
from services.pages import AfterQuery, LimitQuery, Page, unknown_cursor
from services.tenants import repository, schemas
from services.tenants.service import ensure_business

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


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.BusinessOut)
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
