from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ArmIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    policy_id: str = Field(min_length=1, max_length=64)
    weight: float = Field(ge=0)


class PersonaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    instruction: str = Field(min_length=1, max_length=500)


class ExplorationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(ge=0, le=1, description="Probability of drawing a persona.")
    personas: list[PersonaIn] | None = Field(
        default=None, description="Default: tone, length and emoji personas."
    )


class ExperimentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    business_id: str | None = Field(default=None, description="Scope; null = all businesses.")
    unit: Literal["conversation", "business"] = "conversation"
    arms: list[ArmIn] = Field(min_length=1)
    exploration: ExplorationIn | None = None


class WeightsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] = Field(description="Arm name -> new weight.")


class ArmOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    policy_id: str
    weight: float


class ExperimentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    scope: str
    unit: str
    status: str
    exploration: dict[str, Any] | None
    arms: list[ArmOut]
    created_at: datetime
    stopped_at: datetime | None
