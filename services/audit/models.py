from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from services.conversations.models import JSONType
from services.db import Base, UTCDateTime, utcnow


class AuditEvent(Base):
    """One decision: an experiment created, reweighted, stopped, promoted or rolled back; an
    iteration approved, rejected or cancelled. Append-only; its id orders and pages the list."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    action: Mapped[str] = mapped_column(String(64))
    # The API key id that decided, "cli" (a local operator), or the automation ("guardrail").
    actor: Mapped[str] = mapped_column(String(64))
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(64), index=True)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
