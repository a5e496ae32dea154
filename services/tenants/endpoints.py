"""Operator endpoints for businesses."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from services.deps import OperatorDep, SessionDep
from services.errors import Conflict
from services.tenants import repository, schemas
from services.tenants.service import ensure_business

router = APIRouter(prefix="/v1/businesses", tags=["operator"])


@router.get("", response_model=list[schemas.BusinessOut])
def list_businesses(session: SessionDep, _: OperatorDep) -> list[schemas.BusinessOut]:
    return [schemas.BusinessOut.model_validate(b) for b in repository.list_businesses(session)]


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
