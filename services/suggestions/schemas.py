from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SuggestionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(default=1, ge=1, description="Candidates to sample (<= MAX_CANDIDATES).")
    client_request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=190,
        description="Idempotency key: a retried request returns the first suggestions.",
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_new_tokens: int | None = Field(default=None, ge=1, le=1024)


class Candidate(BaseModel):
    suggestion_id: str
    text: str | None
    logprob: float | None


class SuggestionOut(BaseModel):
    suggestion_id: str
    text: str | None = Field(description="null: the policy abstains (send your own message).")
    policy: str
    arm: str
    experiment_id: str
    persona: dict[str, str] | None
    latency_ms: float | None
    truncated: bool = Field(description="Older turns were left out to fit the context window.")
    dropped_turns: int
    fallback: str | None = Field(
        default=None, description="Set when the backend failed and the policy abstained."
    )
    candidates: list[Candidate]
