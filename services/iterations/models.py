from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from services.conversations.models import JSONType
from services.db import Base, UTCDateTime, new_id, utcnow


class IterationStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_APPROVAL = "awaiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Step(enum.StrEnum):
    """The steps of one iteration, in order. Each is idempotent by (iteration id, step)."""

    RETURNS = "returns"
    FIT_Q = "fit_q"
    EVALUATE_Q = "evaluate_q"
    IMPROVE = "improve"
    CHECK = "check"  # pi_{i+1} vs pi_i on held-out states, outcome-rate estimates, before traffic
    REGISTER = "register"
    DEPLOY = "deploy"  # after approval: start the A/B experiment


PIPELINE: tuple[Step, ...] = (
    Step.RETURNS,
    Step.FIT_Q,
    Step.EVALUATE_Q,
    Step.IMPROVE,
    Step.CHECK,
    Step.REGISTER,
)
ACTIVE = (IterationStatus.QUEUED.value, IterationStatus.RUNNING.value)


class Iteration(Base):
    __tablename__ = "iterations"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'awaiting_approval', 'succeeded', 'failed', "
            "'cancelled')",
            name="status",
        ),
        CheckConstraint("algorithm IN ('ppo', 'rloo', 'grpo', 'dmpo', 'dpo')", name="algorithm"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    status: Mapped[str] = mapped_column(String(32), default=IterationStatus.QUEUED.value)
    algorithm: Mapped[str] = mapped_column(String(16))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # The resolved config dataclasses of every step, stored so each policy says how it was made.
    configs: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    parent_policy_id: Mapped[str] = mapped_column(ForeignKey("policies.id", ondelete="RESTRICT"))
    candidate_policy_id: Mapped[str | None] = mapped_column(String(64), default=None)
    experiment_id: Mapped[str | None] = mapped_column(String(32), default=None)
    business_id: Mapped[str | None] = mapped_column(String(64), default=None)
    current_step: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    override_gate: Mapped[bool] = mapped_column(default=False)
    trigger: Mapped[str] = mapped_column(String(16), default="operator")
    # Data window: conversations ended at or before this instant (fixed at creation).
    data_cutoff: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    steps: Mapped[list[IterationStep]] = relationship(
        order_by="IterationStep.started_at", lazy="selectin"
    )
    events: Mapped[list[IterationEvent]] = relationship(
        order_by="IterationEvent.seq", lazy="selectin"
    )


class IterationStep(Base):
    __tablename__ = "iteration_steps"
    __table_args__ = (
        UniqueConstraint("iteration_id", "step"),
        CheckConstraint("status IN ('running', 'done', 'failed')", name="status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    iteration_id: Mapped[str] = mapped_column(ForeignKey("iterations.id", ondelete="CASCADE"))
    step: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="running")
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class IterationEvent(Base):
    __tablename__ = "iteration_events"
    __table_args__ = (UniqueConstraint("iteration_id", "seq"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    iteration_id: Mapped[str] = mapped_column(ForeignKey("iterations.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
