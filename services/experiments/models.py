from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from services.conversations.models import JSONType
from services.db import Base, UTCDateTime, new_id, utcnow

GLOBAL_SCOPE = "*"


class Experiment(Base):
    __tablename__ = "experiments"
    __table_args__ = (
        CheckConstraint("status IN ('running', 'stopped')", name="status"),
        CheckConstraint("unit IN ('conversation', 'business')", name="unit"),
        # Exactly one running experiment per scope (a business, or '*' for all businesses).
        Index(
            "uq_experiments_running_scope",
            "scope",
            unique=True,
            postgresql_where=text("status = 'running'"),
            sqlite_where=text("status = 'running'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    scope: Mapped[str] = mapped_column(String(64))  # a business id, or '*'
    unit: Mapped[str] = mapped_column(String(16), default="conversation")
    salt: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="running")
    # {"epsilon": float, "personas": [{"name": ..., "instruction": ...}, ...]} or None.
    exploration: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    arms: Mapped[list[Arm]] = relationship(order_by="Arm.position", lazy="selectin")


class Arm(Base):
    __tablename__ = "arms"
    __table_args__ = (
        UniqueConstraint("experiment_id", "name"),
        CheckConstraint("weight >= 0", name="weight"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    experiment_id: Mapped[str] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(default=0)
    policy_id: Mapped[str] = mapped_column(ForeignKey("policies.id", ondelete="RESTRICT"))
    weight: Mapped[float] = mapped_column(Float)


class Assignment(Base):
    """A unit's arm in an experiment, fixed at first sight: weight changes never move it."""

    __tablename__ = "assignments"

    experiment_id: Mapped[str] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    unit_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    arm_id: Mapped[str] = mapped_column(ForeignKey("arms.id", ondelete="CASCADE"))
    # Probability of this arm under the weights at assignment time (for off-policy use).
    probability: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
