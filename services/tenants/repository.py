"""All SQL about businesses and API keys."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.db import newest_first_page
from services.tenants.models import ApiKey, Business


def get_business(session: Session, *, business_id: str) -> Business | None:
    return session.get(Business, business_id)


def page_businesses(
    session: Session, *, after: str | None, limit: int
) -> tuple[list[Business], bool]:
    return newest_first_page(session, select(Business), Business, after=after, limit=limit)


def list_businesses(session: Session) -> Sequence[Business]:
    return session.scalars(select(Business).order_by(Business.id)).all()


def add_business(
    session: Session, *, business_id: str, name: str, system_prompt: str | None = None
) -> Business:
    business = Business(id=business_id, name=name, system_prompt=system_prompt)
    session.add(business)
    session.flush()
    return business


def add_api_key(
    session: Session,
    *,
    key_hash: str,
    prefix: str,
    role: str,
    business_id: str | None,
    label: str | None,
) -> ApiKey:
    key = ApiKey(key_hash=key_hash, prefix=prefix, role=role, business_id=business_id, label=label)
    session.add(key)
    session.flush()
    return key


def find_active_key(session: Session, *, key_hash: str) -> ApiKey | None:
    return session.scalars(
        select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    ).first()


def page_api_keys(
    session: Session, *, business_id: str | None, after: str | None, limit: int
) -> tuple[list[ApiKey], bool]:
    query = select(ApiKey)
    if business_id is not None:
        query = query.where(ApiKey.business_id == business_id)
    return newest_first_page(session, query, ApiKey, after=after, limit=limit)


def get_api_key(session: Session, *, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)
