from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class BusinessCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, description="Slug: a-z, 0-9, '-', '_'.")
    name: str | None = Field(default=None, max_length=200)
    system_prompt: str | None = Field(default=None, max_length=20000)


class BusinessOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    system_prompt: str | None
    created_at: datetime


class ApiKeyOut(BaseModel):
    """A key as listed: never the key itself (only its hash is stored)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    prefix: str
    role: str
    business_id: str | None
    label: str | None
    created_at: datetime
    revoked_at: datetime | None
