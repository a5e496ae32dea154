from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.policies.models import PolicyStatus


class PolicyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, description="Version name, never reused.")
    base_model: str = Field(min_length=1, max_length=500)
    adapter_uri: str = Field(min_length=1, max_length=1000)
    parent_id: str | None = None
    status: PolicyStatus = PolicyStatus.CANDIDATE
    config: dict[str, Any] | None = None
    description: str | None = Field(default=None, max_length=2000)


class PolicyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    base_model: str
    adapter_uri: str
    parent_id: str | None
    iteration_id: str | None
    status: PolicyStatus
    config: dict[str, Any] | None
    description: str | None
    created_at: datetime
