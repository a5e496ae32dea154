from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class IterationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["ppo", "rloo", "grpo"] = "ppo"
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="beta (KL to pi_i), gamma, n_epochs, batch_size, learning_rate, any field "
        "of the improvement config, and `q` (Q-fit config fields, e.g. {'kind': 'finetune'}).",
    )
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="Data window and pipeline: business_id, window_days, arms ('policy' | "
        "'all'), include_unlogged, abstentions, importance_clip, max_conversations, "
        "eval_fraction, max_prompts, q_floor, override_gate, ab_weight.",
    )
    parent_policy_id: str | None = Field(
        default=None, description="pi_i; default: the policy serving the scope's largest arm."
    )


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    override_gate: bool = False


class StepOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: str
    status: str
    attempts: int
    worker: str | None
    result: dict[str, Any] | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    kind: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class IterationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["iteration"] = "iteration"
    status: str
    algorithm: str
    hyperparameters: dict[str, Any]
    data: dict[str, Any]
    configs: dict[str, Any]
    parent_policy_id: str
    candidate_policy_id: str | None
    experiment_id: str | None
    current_step: str | None
    progress: float
    metrics: dict[str, Any]
    error: str | None
    override_gate: bool
    trigger: str
    created_at: datetime
    finished_at: datetime | None
    steps: list[StepOut]
    events: list[EventOut]
