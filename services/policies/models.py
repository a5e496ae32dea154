from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from services.conversations.models import JSONType
from services.db import Base, UTCDateTime, utcnow


class PolicyStatus(enum.StrEnum):
    CANDIDATE = "candidate"  # produced by an iteration, awaiting an operator
    APPROVED = "approved"  # an operator approved it; may enter an experiment
    SERVING = "serving"  # an arm of a running experiment
    RETIRED = "retired"  # no longer served
    REJECTED = "rejected"  # an operator turned it down


ALLOWED_TRANSITIONS: dict[PolicyStatus, set[PolicyStatus]] = {
    PolicyStatus.CANDIDATE: {PolicyStatus.APPROVED, PolicyStatus.REJECTED},
    PolicyStatus.APPROVED: {PolicyStatus.SERVING, PolicyStatus.RETIRED},
    PolicyStatus.SERVING: {PolicyStatus.APPROVED, PolicyStatus.RETIRED},
    PolicyStatus.RETIRED: {PolicyStatus.APPROVED},
    PolicyStatus.REJECTED: set(),
}


class Policy(Base):
    """A policy version: one base model plus one LoRA adapter. Immutable once registered."""

    __tablename__ = "policies"
    __table_args__ = (
        CheckConstraint(
            "status IN ('candidate', 'approved', 'serving', 'retired', 'rejected')",
            name="status",
        ),
    )

    # Also the adapter's name on the serving engine, so it is never reused for other weights.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    base_model: Mapped[str] = mapped_column(String(500))
    adapter_uri: Mapped[str] = mapped_column(String(1000))
    parent_id: Mapped[str | None] = mapped_column(
        ForeignKey("policies.id", ondelete="RESTRICT"), default=None
    )
    iteration_id: Mapped[str | None] = mapped_column(String(64), default=None)
    status: Mapped[str] = mapped_column(String(16), default=PolicyStatus.CANDIDATE.value)
    config: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    description: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
