"""Whole conversations as JSON Lines: one conversation per line, imported all-or-nothing.

Line format::

    {"id": str, "business_id": str,
     "messages": [{"role": "customer"|"business", "text": str,
                   "suggestion": str|null,   # optional: shown before this business message;
                                             # null = the policy abstained
                   "outcome": true}],         # optional: outcome observed after this message
     "outcome": 0|1|null,                     # optional shortcut: outcome at the end
     "end": "outcome"|"customer_left"|"business_left"|"timeout"|null,
     "meta": {...}}                           # optional, stored as is

Export writes the canonical form: outcomes on the messages where they were observed, the
top-level "outcome" 1 if any, 0 if the conversation ended without one, null while open.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy.orm import Session

from services.boundary import UnsafeInput, strict_loads
from services.conversations import repository
from services.conversations.classification import classify_reply
from services.conversations.models import (
    Conversation,
    EndReason,
    Message,
    Outcome,
    Source,
    Speaker,
    Suggestion,
)
from services.conversations.service import check_metadata
from services.db import new_id, utcnow
from services.errors import Invalid
from services.settings import Settings
from services.tenants.service import ensure_business, validate_business_id


class MessageRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Speaker
    text: str = Field(min_length=1)
    # Missing key = no suggestion was logged; null = the policy abstained.
    suggestion: str | None = Field(default=None, min_length=1)
    outcome: bool = False
    has_suggestion: bool = Field(default=False, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _note_suggestion_key(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "has_suggestion" in data:
                raise ValueError("unknown field 'has_suggestion'")
            data = {**data, "has_suggestion": "suggestion" in data}
        return data

    @model_validator(mode="after")
    def _only_business_suggestions(self) -> MessageRecord:
        if self.has_suggestion and self.role is not Speaker.BUSINESS:
            raise ValueError("'suggestion' is only allowed on business messages")
        if not self.text.strip():
            raise ValueError("message text must not be blank")
        return self


class ConversationRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    business_id: str = Field(min_length=1, max_length=64)
    messages: list[MessageRecord] = Field(min_length=1)
    outcome: Literal[0, 1] | None = None
    end: EndReason | None = None
    meta: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ConversationRecord:
        try:
            validate_business_id(self.business_id)
        except Invalid as exc:
            raise ValueError(exc.message) from None
        flagged = any(m.outcome for m in self.messages)
        if self.outcome == 0 and flagged:
            raise ValueError("'outcome' is 0 but a message says the outcome was observed")
        if self.end is EndReason.OUTCOME and not (flagged or self.outcome == 1):
            raise ValueError("'end' is 'outcome' but no outcome was observed")
        return self

    def outcome_seqs(self) -> list[int]:
        """1-based positions of the messages after which the outcome was observed."""
        seqs = [i for i, m in enumerate(self.messages, start=1) if m.outcome]
        if not seqs and self.outcome == 1:
            seqs = [len(self.messages)]
        return seqs


@dataclass
class LineError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ImportReport:
    imported: int = 0
    unchanged: int = 0
    businesses_created: list[str] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def parse_lines(
    lines: Iterable[str], *, settings: Settings
) -> tuple[list[tuple[int, ConversationRecord]], list[LineError]]:
    """Parse and validate every line; collect all problems instead of stopping at the first."""
    records: list[tuple[int, ConversationRecord]] = []
    errors: list[LineError] = []
    seen: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            data = strict_loads(raw)  # the API's rule: nothing a store cannot keep exactly
        except json.JSONDecodeError as exc:
            errors.append(LineError(number, f"malformed JSON: {exc.msg} at column {exc.colno}"))
            continue
        except UnsafeInput as exc:
            errors.append(LineError(number, str(exc)))
            continue
        if not isinstance(data, dict):
            errors.append(LineError(number, "a line must be a JSON object"))
            continue
        try:
            record = ConversationRecord.model_validate(data)
        except ValidationError as exc:
            problems = []
            for e in exc.errors():
                where = ".".join(str(p) for p in e["loc"])
                problems.append(f"{where}: {e['msg']}" if where else str(e["msg"]))
            errors.append(LineError(number, "; ".join(problems)))
            continue
        too_long = [
            i
            for i, m in enumerate(record.messages)
            if len(m.text) > settings.max_message_chars
            or (m.suggestion is not None and len(m.suggestion) > settings.max_message_chars)
        ]
        if too_long:
            errors.append(
                LineError(
                    number,
                    f"messages.{too_long[0]}: text longer than {settings.max_message_chars} "
                    "characters (OUTCOMELOOP_MAX_MESSAGE_CHARS)",
                )
            )
            continue
        try:
            check_metadata(record.meta, settings=settings)
        except Invalid as exc:
            errors.append(LineError(number, f"meta: {exc.message}"))
            continue
        key = (record.business_id, record.id)
        if key in seen:
            errors.append(
                LineError(number, f"conversation {record.id!r} already appears on line {seen[key]}")
            )
            continue
        seen[key] = number
        records.append((number, record))
    return records, errors


def export_record(conversation: Conversation) -> dict[str, Any]:
    """The canonical JSONL object of a stored conversation (messages etc. loaded)."""
    suggestion_text = {s.id: s.text for s in conversation.suggestions}
    outcome_seqs = {o.seq for o in conversation.outcomes}
    messages: list[dict[str, Any]] = []
    for message in conversation.messages:
        item: dict[str, Any] = {"role": message.role, "text": message.text}
        if message.suggestion_id is not None:
            item["suggestion"] = suggestion_text[message.suggestion_id]
        if message.seq in outcome_seqs:
            item["outcome"] = True
        messages.append(item)
    if outcome_seqs:
        outcome: int | None = 1
    else:
        outcome = 0 if conversation.status == "closed" else None
    record: dict[str, Any] = {
        "id": conversation.external_id or conversation.id,
        "business_id": conversation.business_id,
        "messages": messages,
        "outcome": outcome,
        "end": conversation.end_reason,
    }
    if conversation.meta:
        record["meta"] = conversation.meta
    return record


def canonical(record: ConversationRecord) -> dict[str, Any]:
    """What `export_record` will write for this record once imported."""
    seqs = set(record.outcome_seqs())
    messages: list[dict[str, Any]] = []
    for seq, m in enumerate(record.messages, start=1):
        item: dict[str, Any] = {"role": m.role.value, "text": m.text}
        if m.has_suggestion:
            item["suggestion"] = m.suggestion
        if seq in seqs:
            item["outcome"] = True
        messages.append(item)
    outcome = 1 if seqs else (0 if record.end is not None else None)
    out: dict[str, Any] = {
        "id": record.id,
        "business_id": record.business_id,
        "messages": messages,
        "outcome": outcome,
        "end": record.end.value if record.end else None,
    }
    if record.meta:
        out["meta"] = record.meta
    return out


def _build_rows(
    record: ConversationRecord, *, settings: Settings
) -> tuple[Conversation, list[Suggestion], list[Message], list[Outcome]]:
    """The rows of one imported conversation, in foreign-key order."""
    now = utcnow()
    conversation = Conversation(
        id=new_id(),
        business_id=record.business_id,
        external_id=record.id,
        status="closed" if record.end else "open",
        end_reason=record.end.value if record.end else None,
        source=Source.IMPORT.value,
        message_count=len(record.messages),
        meta=record.meta,
        created_at=now,
        updated_at=now,
        closed_at=now if record.end else None,
    )
    suggestions: list[Suggestion] = []
    messages: list[Message] = []
    for seq, m in enumerate(record.messages, start=1):
        suggestion_id = relation = similarity = None
        if m.has_suggestion:
            suggestion = Suggestion(
                id=new_id(),
                conversation_id=conversation.id,
                state_seq=seq - 1,
                text=m.suggestion,
                source=Source.IMPORT.value,
                created_at=now,
            )
            suggestions.append(suggestion)
            suggestion_id = suggestion.id
            kind, similarity = classify_reply(
                m.suggestion, m.text, threshold=settings.edit_similarity_threshold
            )
            relation = kind.value
        message = Message(
            id=new_id(),
            conversation_id=conversation.id,
            seq=seq,
            role=m.role.value,
            text=m.text,
            suggestion_id=suggestion_id,
            suggestion_relation=relation,
            edit_similarity=similarity,
            created_at=now,
        )
        messages.append(message)
    outcomes = [
        Outcome(
            conversation_id=conversation.id,
            message_id=messages[seq - 1].id,
            seq=seq,
            created_at=now,
        )
        for seq in record.outcome_seqs()
    ]
    return conversation, suggestions, messages, outcomes


def import_records(
    session: Session,
    records: list[tuple[int, ConversationRecord]],
    *,
    settings: Settings,
    report: ImportReport,
) -> None:
    """Insert new conversations; an identical one already stored is skipped, a different one
    under the same id is an error. The caller commits only if `report.ok`."""
    for number, record in records:
        _, created = ensure_business(session, business_id=record.business_id)
        if created:
            report.businesses_created.append(record.business_id)
        existing = repository.get_conversation_by_external_id(
            session, business_id=record.business_id, external_id=record.id
        ) or repository.get_conversation(
            session, conversation_id=record.id, business_id=record.business_id
        )
        if existing is not None:
            stored = repository.get_conversation(
                session, conversation_id=existing.id, business_id=record.business_id, full=True
            )
            assert stored is not None
            if export_record(stored) == canonical(record):
                report.unchanged += 1
            else:
                report.errors.append(
                    LineError(
                        number,
                        f"conversation {record.id!r} of business {record.business_id!r} is "
                        "already stored with different content",
                    )
                )
            continue
        # Flushed group by group: these tables have no ORM relationships to order the inserts.
        for group in _build_rows(record, settings=settings):
            repository.add_all(session, group if isinstance(group, list) else [group])
        report.imported += 1


def import_lines(session: Session, lines: Iterable[str], *, settings: Settings) -> ImportReport:
    """Validate the whole file, then import it; on any bad line nothing is written."""
    records, errors = parse_lines(lines, settings=settings)
    report = ImportReport(errors=list(errors))
    if report.ok:
        import_records(session, records, settings=settings, report=report)
    return report


def export_lines(
    session: Session, *, business_id: str | None = None, ended_only: bool = False
) -> Iterator[str]:
    for conversation in repository.iter_conversations(
        session, business_id=business_id, ended_only=ended_only
    ):
        yield json.dumps(export_record(conversation), ensure_ascii=False)
