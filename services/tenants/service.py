"""Businesses and API keys: creation, hashing and authentication."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.audit import service as audit
from services.db import utcnow
from services.errors import Conflict, Forbidden, Invalid, NotFound, Unauthenticated
from services.tenants import repository
from services.tenants.models import ApiKey, Business, Role

KEY_PREFIX = "olk_"
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a business (scoped to its own data) or an operator."""

    role: Role
    business_id: str | None
    key_id: str

    def require_business(self) -> str:
        if self.role is not Role.BUSINESS or self.business_id is None:
            raise Forbidden("this endpoint needs a business API key; an operator key was given")
        return self.business_id

    def require_operator(self) -> None:
        if self.role is not Role.OPERATOR:
            raise Forbidden("this endpoint needs an operator API key")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def validate_business_id(business_id: str) -> str:
    if not _SLUG.match(business_id):
        raise Invalid(
            f"business id {business_id!r} must be 1-64 characters of a-z, 0-9, '-' or '_', "
            "starting with a letter or digit"
        )
    return business_id


def ensure_business(
    session: Session, *, business_id: str, name: str | None = None
) -> tuple[Business, bool]:
    """Return the business with this id, creating it if needed; the flag says if it is new."""
    validate_business_id(business_id)
    existing = repository.get_business(session, business_id=business_id)
    if existing is not None:
        return existing, False
    try:
        with session.begin_nested():
            business = repository.add_business(
                session, business_id=business_id, name=name or business_id
            )
    except IntegrityError:  # a concurrent request created it a moment ago
        existing = repository.get_business(session, business_id=business_id)
        if existing is None:
            raise
        return existing, False
    return business, True


def create_api_key(
    session: Session, *, role: Role, business_id: str | None = None, label: str | None = None
) -> str:
    """Create a key and return its plaintext, which is shown once and never stored."""
    if role is Role.BUSINESS:
        if business_id is None:
            raise Invalid("a business key needs a business")
        ensure_business(session, business_id=business_id)
    elif business_id is not None:
        raise Invalid("an operator key belongs to no business")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    repository.add_api_key(
        session,
        key_hash=hash_key(plaintext),
        prefix=plaintext[: len(KEY_PREFIX) + 6],
        role=role.value,
        business_id=business_id,
        label=label,
    )
    return plaintext


def authenticate(session: Session, *, authorization: str | None) -> Principal:
    if not authorization:
        raise Unauthenticated("missing Authorization header; send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization header must be 'Bearer <key>'")
    key = repository.find_active_key(session, key_hash=hash_key(token.strip()))
    if key is None:
        raise Unauthenticated("unknown or revoked API key")
    return Principal(role=Role(key.role), business_id=key.business_id, key_id=key.id)


def revoke_api_key(session: Session, *, key_id: str, actor: str) -> ApiKey:
    """Revoke a key at once (every later request with it is a 401); revoking again is a no-op.
    An operator cannot revoke the key it is calling with (it would lock itself out)."""
    key = repository.get_api_key(session, key_id=key_id)
    if key is None:
        raise NotFound(f"API key {key_id} not found")
    if key_id == actor:
        raise Conflict("this is the key making the request; revoke it with another operator key")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
        audit.record(
            session,
            actor=actor,
            action="api_key.revoked",
            subject_type="api_key",
            subject_id=key.id,
            data={"role": key.role, "business_id": key.business_id, "prefix": key.prefix},
        )
    return key
