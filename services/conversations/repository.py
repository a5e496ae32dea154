"""All SQL about the conversation log."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.orm import Session, selectinload

from services.conversations.models import Conversation, Message, Outcome, Suggestion


def get_conversation(
    session: Session, *, conversation_id: str, business_id: str, full: bool = False
) -> Conversation | None:
    query = select(Conversation).where(
        Conversation.id == conversation_id, Conversation.business_id == business_id
    )
    if full:
        query = query.options(
            selectinload(Conversation.messages),
            selectinload(Conversation.suggestions),
            selectinload(Conversation.outcomes),
        )
    return session.scalars(query).first()


def get_conversation_by_external_id(
    session: Session, *, business_id: str, external_id: str
) -> Conversation | None:
    return session.scalars(
        select(Conversation).where(
            Conversation.business_id == business_id, Conversation.external_id == external_id
        )
    ).first()


def lock_conversation(
    session: Session, *, conversation_id: str, business_id: str
) -> Conversation | None:
    """Take the conversation's write lock and return its current row.

    A no-op UPDATE rather than SELECT ... FOR UPDATE: it locks the row on Postgres and takes
    SQLite's write lock as the transaction's first statement, so appends to one conversation
    are serialised on both backends.
    """
    locked = session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.business_id == business_id)
        .values(message_count=Conversation.message_count)
        .returning(Conversation.id)
        .execution_options(synchronize_session=False)
    ).first()
    if locked is None:
        return None
    return session.get(Conversation, conversation_id, populate_existing=True)


LogRow = Conversation | Message | Suggestion | Outcome


def add(session: Session, row: LogRow) -> None:
    session.add(row)
    session.flush()


def add_all(
    session: Session, rows: Sequence[Conversation | Message | Suggestion | Outcome]
) -> None:
    session.add_all(rows)
    session.flush()


def find_message_by_client_id(
    session: Session, *, conversation_id: str, client_message_id: str
) -> Message | None:
    return session.scalars(
        select(Message).where(
            Message.conversation_id == conversation_id,
            Message.client_message_id == client_message_id,
        )
    ).first()


def find_outcome_by_client_id(
    session: Session, *, conversation_id: str, client_id: str
) -> Outcome | None:
    return session.scalars(
        select(Outcome).where(
            Outcome.conversation_id == conversation_id, Outcome.client_id == client_id
        )
    ).first()


def find_suggestion_by_client_id(
    session: Session, *, conversation_id: str, client_request_id: str
) -> Suggestion | None:
    return session.scalars(
        select(Suggestion).where(
            Suggestion.conversation_id == conversation_id,
            Suggestion.client_request_id == client_request_id,
        )
    ).first()


def suggestions_for_request(
    session: Session, *, conversation_id: str, client_request_ids: Sequence[str]
) -> list[Suggestion]:
    """The suggestions logged under these request ids, in the order of the ids."""
    rows = session.scalars(
        select(Suggestion).where(
            Suggestion.conversation_id == conversation_id,
            Suggestion.client_request_id.in_(list(client_request_ids)),
        )
    ).all()
    order = {key: i for i, key in enumerate(client_request_ids)}
    return sorted(rows, key=lambda row: order[row.client_request_id or ""])


def get_suggestion(session: Session, *, suggestion_id: str) -> Suggestion | None:
    return session.get(Suggestion, suggestion_id)


def message_linked_to(session: Session, *, suggestion_id: str) -> Message | None:
    return session.scalars(select(Message).where(Message.suggestion_id == suggestion_id)).first()


def get_message(session: Session, *, conversation_id: str, message_id: str) -> Message | None:
    return session.scalars(
        select(Message).where(Message.conversation_id == conversation_id, Message.id == message_id)
    ).first()


def last_message(session: Session, *, conversation_id: str) -> Message | None:
    return session.scalars(
        select(Message)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.seq.desc())
        .limit(1)
    ).first()


def count_outcomes(session: Session, *, conversation_id: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Outcome)
            .where(Outcome.conversation_id == conversation_id)
        )
        or 0
    )


def iter_conversations_by_ids(
    session: Session, ids: Sequence[str], *, batch_size: int = 200
) -> Iterator[Conversation]:
    """These conversations with messages, suggestions and outcomes loaded, in the given order."""
    for start in range(0, len(ids), batch_size):
        chunk = list(ids[start : start + batch_size])
        rows = session.scalars(
            select(Conversation)
            .where(Conversation.id.in_(chunk))
            .options(
                selectinload(Conversation.messages),
                selectinload(Conversation.suggestions),
                selectinload(Conversation.outcomes),
            )
        ).all()
        by_id = {row.id: row for row in rows}
        for conversation_id in chunk:
            yield by_id[conversation_id]


def iter_conversations(
    session: Session,
    *,
    business_id: str | None = None,
    ended_only: bool = False,
    since: datetime | None = None,
    batch_size: int = 200,
) -> Iterator[Conversation]:
    """Stream conversations with messages, suggestions and outcomes loaded, oldest first."""
    query = select(Conversation).order_by(Conversation.created_at, Conversation.id)
    if business_id is not None:
        query = query.where(Conversation.business_id == business_id)
    if ended_only:
        query = query.where(Conversation.status == "closed")
    if since is not None:
        query = query.where(Conversation.created_at >= since)
    ids = list(session.scalars(query.with_only_columns(Conversation.id)))
    yield from iter_conversations_by_ids(session, ids, batch_size=batch_size)


def ended_conversation_ids(
    session: Session,
    *,
    closed_before: datetime,
    created_after: datetime | None = None,
    business_id: str | None = None,
    limit: int | None = None,
) -> list[str]:
    """Ended conversations of a data window, most recent first."""
    query = (
        select(Conversation.id)
        .where(Conversation.status == "closed", Conversation.closed_at <= closed_before)
        .order_by(Conversation.closed_at.desc(), Conversation.id)
    )
    if created_after is not None:
        query = query.where(Conversation.created_at >= created_after)
    if business_id is not None:
        query = query.where(Conversation.business_id == business_id)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def count_ended_since(session: Session, *, since: datetime | None) -> int:
    query = select(func.count()).select_from(Conversation).where(Conversation.status == "closed")
    if since is not None:
        query = query.where(Conversation.closed_at > since)
    return session.scalar(query) or 0


# The decisions of each conversation and their Monte Carlo returns, by the rules in
# workers/learning/returns.py: decisions are suggestions (at their state_seq) and business turns
# that no suggestion answered (at the state before the turn); a business turn is a run of
# consecutive business messages; the first outcome absorbs. Every decision is returned, with
# `after_outcome` = 1 for those the absorbing outcome removes, so callers can count them.
#
# Linear per conversation: window functions number the turns and count them before each
# decision, where correlated subqueries over CTEs (no index) made it quadratic per chunk
# (tests/benchmarks/bench_returns.py: 150x slower than a Python loop over the same rows).
_DECISION_RETURNS = text(
    """
    WITH msgs AS (
        SELECT m.conversation_id, m.id AS message_id, m.seq, m.role, m.suggestion_id,
               CASE WHEN m.role = 'business'
                     AND COALESCE(LAG(m.role) OVER (
                         PARTITION BY m.conversation_id ORDER BY m.seq), '') <> 'business'
                    THEN 1 ELSE 0 END AS turn_start
        FROM messages m
        WHERE m.conversation_id IN :ids
    ),
    numbered AS (
        SELECT conversation_id, message_id, seq, role, suggestion_id, turn_start,
               SUM(turn_start) OVER (
                   PARTITION BY conversation_id ORDER BY seq ROWS UNBOUNDED PRECEDING
               ) AS turn_no
        FROM msgs
    ),
    turns AS (
        SELECT conversation_id, turn_no, MIN(seq) AS start_seq,
               MIN(CASE WHEN turn_start = 1 THEN message_id END) AS message_id,
               MAX(CASE WHEN suggestion_id IS NOT NULL THEN 1 ELSE 0 END) AS answered
        FROM numbered
        WHERE role = 'business'
        GROUP BY conversation_id, turn_no
    ),
    bounds AS (
        SELECT o.conversation_id, MIN(o.seq) AS outcome_seq
        FROM outcomes o
        WHERE o.conversation_id IN :ids
        GROUP BY o.conversation_id
    ),
    deciding AS (
        SELECT b.conversation_id, b.outcome_seq,
               MAX(CASE WHEN t.start_seq <= b.outcome_seq THEN t.start_seq END)
                   AS deciding_start,
               SUM(CASE WHEN t.start_seq <= b.outcome_seq THEN 1 ELSE 0 END)
                   AS turns_upto_outcome
        FROM bounds b
        LEFT JOIN turns t ON t.conversation_id = b.conversation_id
        GROUP BY b.conversation_id, b.outcome_seq
    ),
    decisions AS (
        SELECT s.conversation_id, s.id AS suggestion_id, NULL AS message_id, s.state_seq,
               s.created_at AS made_at
        FROM suggestions s
        WHERE s.conversation_id IN :ids
        UNION ALL
        SELECT t.conversation_id, NULL AS suggestion_id, t.message_id, t.start_seq - 1,
               NULL AS made_at
        FROM turns t
        WHERE t.answered = 0
    ),
    events AS (
        SELECT conversation_id, start_seq AS pos, 0 AS is_decision, 1 AS is_turn,
               NULL AS suggestion_id, NULL AS message_id, NULL AS state_seq, NULL AS made_at
        FROM turns
        UNION ALL
        SELECT conversation_id, state_seq AS pos, 1 AS is_decision, 0 AS is_turn,
               suggestion_id, message_id, state_seq, made_at
        FROM decisions
    ),
    counted AS (
        -- turns started at or before each decision's state: a turn at the state's own seq
        -- sorts first (is_decision 0)
        SELECT e.conversation_id, e.suggestion_id, e.message_id, e.state_seq, e.made_at,
               e.is_decision,
               SUM(e.is_turn) OVER (
                   PARTITION BY e.conversation_id ORDER BY e.pos, e.is_decision
                   ROWS UNBOUNDED PRECEDING
               ) AS turn
        FROM events e
    ),
    scored AS (
        SELECT c.conversation_id, c.suggestion_id, c.message_id, c.state_seq, c.made_at, c.turn,
               g.outcome_seq,
               g.turns_upto_outcome - c.turn AS turns_to_outcome,
               CASE WHEN g.outcome_seq IS NULL THEN 0
                    WHEN g.deciding_start IS NOT NULL AND c.state_seq < g.deciding_start THEN 0
                    ELSE 1 END AS after_outcome
        FROM counted c
        LEFT JOIN deciding g ON g.conversation_id = c.conversation_id
        WHERE c.is_decision = 1
    )
    SELECT conversation_id, suggestion_id, message_id, state_seq, turn, outcome_seq,
           after_outcome,
           CASE WHEN after_outcome = 0 AND turns_to_outcome = 1 THEN 1.0 ELSE 0.0 END AS reward,
           CASE WHEN after_outcome = 1 OR outcome_seq IS NULL THEN 0.0
                ELSE POWER(:gamma, turns_to_outcome - 1) END AS ret
    FROM scored
    ORDER BY conversation_id, state_seq, made_at IS NULL, made_at, suggestion_id, message_id
    """
).bindparams(bindparam("ids", expanding=True))


def decision_returns(
    session: Session, *, conversation_ids: Sequence[str], gamma: float, chunk: int = 500
) -> list[dict[str, object]]:
    """Per decision, in order within each conversation: conversation_id, suggestion_id (or
    None), message_id (the business turn, where no suggestion), state_seq, turn (business turns
    before the state), outcome_seq (first outcome, or None), after_outcome (0/1), reward and ret
    (the Monte Carlo return), computed by the database."""
    rows: list[dict[str, object]] = []
    for start in range(0, len(conversation_ids), chunk):
        ids = list(conversation_ids[start : start + chunk])
        result = session.execute(_DECISION_RETURNS, {"ids": ids, "gamma": float(gamma)})
        rows.extend(dict(row._mapping) for row in result)
    return rows
