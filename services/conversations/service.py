"""The conversation log's rules. Services flush; the caller's edge commits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.conversations import repository
from services.conversations.classification import classify_reply
from services.conversations.models import (
    Conversation,
    EndReason,
    Message,
    Outcome,
    Speaker,
    Suggestion,
)
from services.db import utcnow
from services.errors import Conflict, Invalid, NotFound
from services.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Written(Generic[T]):
    """A write's result; `replayed` when an idempotency key matched an earlier write."""

    row: T
    replayed: bool = False
    arm: str | None = None  # for a business message: the arm of the suggestion it answered


def check_text(text: str, *, settings: Settings, what: str = "text") -> str:
    if not text or not text.strip():
        raise Invalid(f"{what} must not be empty")
    if "\x00" in text:
        raise Invalid(f"{what} contains a NUL character (\\x00), which no text field stores")
    if len(text) > settings.max_message_chars:
        raise Invalid(
            f"{what} is {len(text)} characters; the limit is {settings.max_message_chars} "
            "(OUTCOMELOOP_MAX_MESSAGE_CHARS)"
        )
    return text


def _not_found(conversation_id: str) -> NotFound:
    return NotFound(f"conversation {conversation_id} not found")


def check_metadata(meta: dict[str, Any] | None, *, settings: Settings) -> None:
    """Free-form metadata is stored as is, up to OUTCOMELOOP_MAX_METADATA_BYTES of JSON."""
    if meta is None:
        return
    size = len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if size > settings.max_metadata_bytes:
        raise Invalid(
            f"metadata is {size} bytes of JSON; the limit is {settings.max_metadata_bytes} "
            "(OUTCOMELOOP_MAX_METADATA_BYTES)",
            param="metadata",
        )


def create_conversation(
    session: Session,
    *,
    business_id: str,
    client_conversation_id: str | None = None,
    meta: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> Written[Conversation]:
    """A new conversation; a retry with the same client_conversation_id returns the first one
    (a different metadata is a conflict), also when the retries race each other. With
    `settings`, the metadata's size is checked."""
    if settings is not None:
        check_metadata(meta, settings=settings)
    if client_conversation_id is not None:
        existing = repository.get_conversation_by_external_id(
            session, business_id=business_id, external_id=client_conversation_id
        )
        if existing is not None:
            return _replayed(existing, client_conversation_id, meta)
    conversation = Conversation(
        business_id=business_id, external_id=client_conversation_id, meta=meta
    )
    try:
        with session.begin_nested():
            repository.add(session, conversation)
    except IntegrityError:  # a concurrent create with the same id committed first
        if client_conversation_id is None:
            raise
        existing = repository.get_conversation_by_external_id(
            session, business_id=business_id, external_id=client_conversation_id
        )
        if existing is None:
            raise
        return _replayed(existing, client_conversation_id, meta)
    return Written(conversation)


def _replayed(
    existing: Conversation, client_conversation_id: str, meta: dict[str, Any] | None
) -> Written[Conversation]:
    if (existing.meta or None) != (meta or None):
        raise Conflict(
            f"client_conversation_id {client_conversation_id!r} was already used for "
            f"conversation {existing.id} with different metadata",
            param="metadata",
        )
    return Written(existing, replayed=True)


def get_conversation(session: Session, *, business_id: str, conversation_id: str) -> Conversation:
    conversation = repository.get_conversation(
        session, conversation_id=conversation_id, business_id=business_id, full=True
    )
    if conversation is None:
        raise _not_found(conversation_id)
    return conversation


def _lock(session: Session, *, business_id: str, conversation_id: str) -> Conversation:
    conversation = repository.lock_conversation(
        session, conversation_id=conversation_id, business_id=business_id
    )
    if conversation is None:
        raise _not_found(conversation_id)
    return conversation


def append_message(
    session: Session,
    *,
    settings: Settings,
    business_id: str,
    conversation_id: str,
    role: Speaker,
    text: str,
    suggestion_id: str | None = None,
    client_message_id: str | None = None,
) -> Written[Message]:
    """Append a message at the conversation's next position, under its write lock."""
    check_text(text, settings=settings)
    conversation = _lock(session, business_id=business_id, conversation_id=conversation_id)

    if client_message_id is not None:
        earlier = repository.find_message_by_client_id(
            session, conversation_id=conversation.id, client_message_id=client_message_id
        )
        if earlier is not None:
            if (earlier.role, earlier.text, earlier.suggestion_id) != (
                role.value,
                text,
                suggestion_id,
            ):
                raise Conflict(
                    f"client_message_id {client_message_id!r} was already used for a different "
                    f"message (seq {earlier.seq}) in conversation {conversation.id}"
                )
            return Written(earlier, replayed=True)

    if conversation.status == "closed":
        raise Conflict(
            f"conversation {conversation.id} is closed ({conversation.end_reason}); "
            "it accepts no more messages"
        )

    relation = similarity = arm = None
    if suggestion_id is not None:
        if role is not Speaker.BUSINESS:
            raise Invalid("suggestion_id is only allowed on business messages")
        suggestion = repository.get_suggestion(session, suggestion_id=suggestion_id)
        if suggestion is None or suggestion.conversation_id != conversation.id:
            raise Invalid(
                f"suggestion {suggestion_id} does not belong to conversation {conversation.id}"
            )
        linked = repository.message_linked_to(session, suggestion_id=suggestion_id)
        if linked is not None:
            raise Conflict(
                f"suggestion {suggestion_id} was already answered by message seq {linked.seq}"
            )
        relation, similarity = classify_reply(
            suggestion.text, text, threshold=settings.edit_similarity_threshold
        )
        arm = suggestion.arm

    now = utcnow()
    conversation.message_count += 1
    conversation.updated_at = now
    message = Message(
        conversation_id=conversation.id,
        seq=conversation.message_count,
        role=role.value,
        text=text,
        client_message_id=client_message_id,
        suggestion_id=suggestion_id,
        suggestion_relation=relation.value if relation else None,
        edit_similarity=similarity,
        created_at=now,
    )
    repository.add(session, message)
    return Written(message, arm=arm)


def record_suggestion(
    session: Session,
    *,
    settings: Settings,
    business_id: str,
    conversation_id: str,
    text: str | None,
    policy_version: str | None = None,
    arm: str | None = None,
    experiment_id: str | None = None,
    sampling_params: dict[str, Any] | None = None,
    persona: dict[str, Any] | None = None,
    logprob: float | None = None,
    propensity: float | None = None,
    latency_ms: float | None = None,
    client_request_id: str | None = None,
    state_seq: int | None = None,
) -> Written[Suggestion]:
    """Log a suggestion (text None = abstained) for the state ending at message `state_seq`
    (default: the latest message)."""
    if text is not None:  # model output: a NUL (which PostgreSQL text cannot hold) is dropped
        text = text.replace("\x00", "")[: settings.max_message_chars]
    conversation = _lock(session, business_id=business_id, conversation_id=conversation_id)
    if client_request_id is not None:
        earlier = repository.find_suggestion_by_client_id(
            session, conversation_id=conversation.id, client_request_id=client_request_id
        )
        if earlier is not None:
            return Written(earlier, replayed=True)
    if state_seq is None:
        state_seq = conversation.message_count
    if not 0 <= state_seq <= conversation.message_count:
        raise Invalid(f"state_seq {state_seq} is outside 0..{conversation.message_count}")
    suggestion = Suggestion(
        conversation_id=conversation.id,
        state_seq=state_seq,
        text=text,
        policy_version=policy_version,
        arm=arm,
        experiment_id=experiment_id,
        sampling_params=sampling_params,
        persona=persona,
        logprob=logprob,
        propensity=propensity,
        latency_ms=latency_ms,
        client_request_id=client_request_id,
    )
    repository.add(session, suggestion)
    return Written(suggestion)


def record_outcome(
    session: Session,
    *,
    business_id: str,
    conversation_id: str,
    label: str | None = None,
    message_id: str | None = None,
    client_event_id: str | None = None,
) -> Written[Outcome]:
    """Record that the outcome happened, observed right after a message (default: the latest).

    Allowed after close too: a purchase often lands after the chat went quiet.
    """
    conversation = _lock(session, business_id=business_id, conversation_id=conversation_id)
    if client_event_id is not None:
        earlier = repository.find_outcome_by_client_id(
            session, conversation_id=conversation.id, client_id=client_event_id
        )
        if earlier is not None:
            same = earlier.label == label and message_id in (None, earlier.message_id)
            if not same:
                raise Conflict(
                    f"client_event_id {client_event_id!r} was already used for a different "
                    f"outcome in conversation {conversation.id}"
                )
            return Written(earlier, replayed=True)
    if message_id is not None:
        message = repository.get_message(
            session, conversation_id=conversation.id, message_id=message_id
        )
        if message is None:
            raise Invalid(f"message {message_id} does not belong to conversation {conversation.id}")
    else:
        message = repository.last_message(session, conversation_id=conversation.id)
        if message is None:
            raise Conflict(
                f"conversation {conversation.id} has no messages; an outcome is observed at one"
            )
    outcome = Outcome(
        conversation_id=conversation.id,
        message_id=message.id,
        seq=message.seq,
        label=label,
        client_id=client_event_id,
    )
    conversation.updated_at = utcnow()
    repository.add(session, outcome)
    return Written(outcome)


def close_conversation(
    session: Session, *, business_id: str, conversation_id: str, reason: EndReason
) -> Written[Conversation]:
    """Close with an end reason; closing again with the same reason is a no-op."""
    conversation = _lock(session, business_id=business_id, conversation_id=conversation_id)
    if conversation.status == "closed":
        if conversation.end_reason == reason.value:
            return Written(conversation, replayed=True)
        raise Conflict(
            f"conversation {conversation.id} is already closed with reason "
            f"{conversation.end_reason!r}, not {reason.value!r}"
        )
    if reason is EndReason.OUTCOME and not repository.count_outcomes(
        session, conversation_id=conversation.id
    ):
        raise Conflict(
            f"conversation {conversation.id} has no recorded outcome; POST .../outcome first "
            "or close with another reason"
        )
    now = utcnow()
    conversation.status = "closed"
    conversation.end_reason = reason.value
    conversation.closed_at = now
    conversation.updated_at = now
    session.flush()
    return Written(conversation)
