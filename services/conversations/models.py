"""Tables of the conversation log.

The paper's state s_i is everything up to the i-th customer message: in this schema, the
messages of a conversation with `seq <= state_seq` plus the suggestions made before them.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from services.db import Base, UTCDateTime, new_id, utcnow

JSONType = JSON().with_variant(JSONB(), "postgresql")


class Speaker(enum.StrEnum):
    CUSTOMER = "customer"
    BUSINESS = "business"


class EndReason(enum.StrEnum):
    OUTCOME = "outcome"
    CUSTOMER_LEFT = "customer_left"
    BUSINESS_LEFT = "business_left"
    TIMEOUT = "timeout"


class Relation(enum.StrEnum):
    """How the business message relates to the suggestion shown before it."""

    ACCEPTED = "accepted"  # sent verbatim (up to whitespace)
    EDITED = "edited"  # similarity >= threshold
    REJECTED = "rejected"  # similarity < threshold: the business wrote its own
    ABSTAINED = "abstained"  # the policy abstained, so the business wrote its own


class Source(enum.StrEnum):
    API = "api"
    IMPORT = "import"


def _in(column: str, values: type[enum.StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("business_id", "external_id"),
        CheckConstraint("status IN ('open', 'closed')", name="status"),
        CheckConstraint(f"end_reason IS NULL OR {_in('end_reason', EndReason)}", name="end_reason"),
        CheckConstraint("(status = 'closed') = (end_reason IS NOT NULL)", name="closed_has_reason"),
        CheckConstraint(_in("source", Source), name="source"),
        Index("ix_conversations_business_id_created_at", "business_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    business_id: Mapped[str] = mapped_column(ForeignKey("businesses.id", ondelete="CASCADE"))
    # The client's own id for the conversation (or the id in an imported file): makes create
    # and import idempotent.
    external_id: Mapped[str | None] = mapped_column(String(200), default=None)
    status: Mapped[str] = mapped_column(String(16), default="open")
    end_reason: Mapped[str | None] = mapped_column(String(32), default=None)
    source: Mapped[str] = mapped_column(String(16), default=Source.API.value)
    # Number of messages so far = seq of the latest one; bumped under the row lock on append.
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    # The A/B arm serving this conversation, fixed at its first suggestion for its whole life.
    arm_id: Mapped[str | None] = mapped_column(
        ForeignKey("arms.id", ondelete="RESTRICT"), default=None, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    messages: Mapped[list[Message]] = relationship(
        order_by="Message.seq", back_populates="conversation", lazy="raise"
    )
    suggestions: Mapped[list[Suggestion]] = relationship(
        order_by="Suggestion.created_at", lazy="raise"
    )
    outcomes: Mapped[list[Outcome]] = relationship(order_by="Outcome.seq", lazy="raise")


class Suggestion(Base):
    __tablename__ = "suggestions"
    __table_args__ = (
        UniqueConstraint("conversation_id", "client_request_id"),
        CheckConstraint(_in("source", Source), name="source"),
        CheckConstraint("state_seq >= 0", name="state_seq"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    # The suggestion was made for the state made of messages 1..state_seq.
    state_seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str | None] = mapped_column(Text, default=None)  # None = abstained
    policy_version: Mapped[str | None] = mapped_column(String(200), default=None)
    arm: Mapped[str | None] = mapped_column(String(200), default=None)
    experiment_id: Mapped[str | None] = mapped_column(String(64), default=None)
    sampling_params: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    persona: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    # log pi(a|s) of the text under the policy that sampled it, and the probability of the
    # behaviour choices (arm, persona) that led to it: inputs to off-policy correction.
    logprob: Mapped[float | None] = mapped_column(Float, default=None)
    propensity: Mapped[float | None] = mapped_column(Float, default=None)
    latency_ms: Mapped[float | None] = mapped_column(Float, default=None)
    source: Mapped[str] = mapped_column(String(16), default=Source.API.value)
    client_request_id: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    @property
    def abstained(self) -> bool:
        return self.text is None


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq"),
        UniqueConstraint("conversation_id", "client_message_id"),
        CheckConstraint(_in("role", Speaker), name="role"),
        CheckConstraint(
            f"suggestion_relation IS NULL OR {_in('suggestion_relation', Relation)}",
            name="suggestion_relation",
        ),
        CheckConstraint(
            "(suggestion_id IS NULL) = (suggestion_relation IS NULL)", name="relation_iff_linked"
        ),
        CheckConstraint("suggestion_id IS NULL OR role = 'business'", name="only_business_links"),
        CheckConstraint("seq >= 1", name="seq"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    client_message_id: Mapped[str | None] = mapped_column(String(200), default=None)
    # A suggestion is answered by at most one business message.
    suggestion_id: Mapped[str | None] = mapped_column(
        ForeignKey("suggestions.id", ondelete="SET NULL"), unique=True, default=None
    )
    suggestion_relation: Mapped[str | None] = mapped_column(String(16), default=None)
    edit_similarity: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages", lazy="raise")


class Outcome(Base):
    __tablename__ = "outcomes"
    __table_args__ = (
        UniqueConstraint("conversation_id", "client_id"),
        CheckConstraint("seq >= 1", name="seq"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    # Observed right after message `seq`: the reward lands on the step that message closes.
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(200), default=None)
    value: Mapped[float] = mapped_column(Float, default=1.0)
    client_id: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
