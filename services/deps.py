"""FastAPI dependencies shared by the routers: session, settings, caller."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from services.settings import Settings
from services.tenants.service import Principal, authenticate

log = logging.getLogger(__name__)


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request. Routers commit before answering; anything else rolls back."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        try:
            session.rollback()
            session.close()
        except SQLAlchemyError as exc:
            # The database went away after the route answered (a restart): the connection is
            # dead and is dropped from the pool; the answer already given stands.
            log.warning("closing a request's session failed: %s", exc)
            session.invalidate()


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


# Documents the scheme in OpenAPI; checking the key (and the 401 for a missing one, in our
# error format) stays with `authenticate`.
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="An API key (`outcomeloop keys create`): a business's key for its own "
    "conversations and suggestions, an operator's for everything else.",
)


def get_principal(
    session: SessionDep,
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    return authenticate(session, authorization=authorization)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def business_id_of(principal: PrincipalDep) -> str:
    return principal.require_business()


def require_operator(principal: PrincipalDep) -> Principal:
    principal.require_operator()
    return principal


BusinessIdDep = Annotated[str, Depends(business_id_of)]
OperatorDep = Annotated[Principal, Depends(require_operator)]
