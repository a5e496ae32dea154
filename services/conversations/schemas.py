"""Request and response bodies of the conversation endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.conversations.models import EndReason, Relation, Speaker

ClientId = Field(default=None, min_length=1, max_length=200)


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client_conversation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Your own id for the conversation; a retried create returns the first result.",
    )
    metadata: dict[str, Any] | None = Field(default=None, description="Free-form, stored as is.")


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Speaker
    text: str = Field(description="The message text; empty or oversized text is refused.")
    suggestion_id: str | None = Field(
        default=None,
        max_length=64,
        description="For a business message: the suggestion shown before it was written.",
    )
    client_message_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Idempotency key: a retried request returns the first result.",
    )


class OutcomeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(default=None, max_length=200, description="e.g. 'purchase'.")
    message_id: str | None = Field(
        default=None, max_length=64, description="Observed after this message; default: latest."
    )
    client_event_id: str | None = Field(default=None, min_length=1, max_length=200)


class CloseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: EndReason


class MessageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    seq: int
    role: Speaker
    text: str
    client_message_id: str | None
    suggestion_id: str | None
    suggestion_relation: Relation | None
    edit_similarity: float | None
    created_at: datetime


class SuggestionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    state_seq: int
    text: str | None
    policy_version: str | None
    arm: str | None
    persona: dict[str, Any] | None
    sampling_params: dict[str, Any] | None
    logprob: float | None
    propensity: float | None
    latency_ms: float | None
    source: str
    created_at: datetime


class OutcomeOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    seq: int
    message_id: str
    label: str | None
    client_id: str | None
    created_at: datetime


class ConversationSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    business_id: str
    client_conversation_id: str | None = Field(validation_alias="external_id")
    status: str
    end_reason: EndReason | None
    message_count: int
    created_at: datetime
    closed_at: datetime | None


class ConversationOut(ConversationSummary):
    messages: list[MessageOut]
    suggestions: list[SuggestionOut]
    outcomes: list[OutcomeOut]
