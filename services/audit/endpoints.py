"""GET /v1/audit: every operator decision, oldest first (a log to tail), paged by id."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from services.audit import schemas, service
from services.deps import OperatorDep, SessionDep
from services.pages import MAX_INT_CURSOR, Page

router = APIRouter(prefix="/v1/audit", tags=["operator"])


@router.get("", response_model=Page[schemas.AuditEventOut])
def list_audit(
    session: SessionDep,
    _: OperatorDep,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_INT_CURSOR, description="Last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Page[schemas.AuditEventOut]:
    events, has_more = service.list_events(session, after=after, limit=limit)
    return Page(data=[schemas.AuditEventOut.model_validate(e) for e in events], has_more=has_more)
