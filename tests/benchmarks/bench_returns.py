"""The returns step's query on Postgres, from 10k to 1M logged messages, against two baselines
measured in the same run: a plain Python loop computing the same returns from the same rows
(what the database saves us), and one sequential read of those rows (the limit: reading the
table once).

    python -m tests.benchmarks.bench_returns [--sizes 10000 100000 1000000] [--results FILE]

Data: conversations of 10 messages (customer and business alternating, so 5 decisions each),
a fifth of them reaching the outcome after the business's last message, written by SQL
(generate_series) into a fresh database. Timed: `decision_returns` over every conversation (the
returns step's query, chunks of 500 conversations), the Python loop over `SELECT ... ORDER BY
conversation, seq`, and that SELECT alone. Checks that the two computations agree, prints
seconds, the ratios and microseconds per message (how time grows), and with --results appends
a JSON line (machine, date, commit, figures).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from services.conversations.repository import decision_returns
from services.db import make_engine, make_session_factory, session_scope
from services.migrate import upgrade
from tests.benchmarks.results import append_result

ADMIN_URL = os.environ.get(
    "OUTCOMELOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PER_CONVERSATION = 10
GAMMA = 0.9

FILL = """
INSERT INTO businesses (id, name, created_at) VALUES ('bench', 'bench', now());
INSERT INTO conversations (id, business_id, external_id, status, end_reason, source,
                           message_count, created_at, updated_at, closed_at)
SELECT 'c' || i, 'bench', 'e' || i, 'closed',
       CASE WHEN i % 5 = 0 THEN 'outcome' ELSE 'customer_left' END, 'api', :per,
       now(), now(), now()
FROM generate_series(1, :n) AS i;
INSERT INTO messages (id, conversation_id, seq, role, text, created_at)
SELECT 'm' || i || '-' || s, 'c' || i, s,
       CASE WHEN s % 2 = 1 THEN 'customer' ELSE 'business' END, 'message ' || s, now()
FROM generate_series(1, :n) AS i, generate_series(1, :per) AS s;
INSERT INTO outcomes (id, conversation_id, message_id, seq, value, created_at)
SELECT 'o' || i, 'c' || i, 'm' || i || '-' || :per, :per, 1.0, now()
FROM generate_series(5, :n, 5) AS i;
ANALYZE;
"""


def python_returns(rows: list[tuple[str, int, str]], outcomes: dict[str, int]) -> dict[str, float]:
    """Sum of the returns per conversation, by the definition written as a loop: a business
    turn (consecutive business messages) is a decision; with an outcome observed after message
    k, the decision whose turn is the last to start at or before k gets reward 1 and each
    earlier one gamma^(turns until that one), later ones 0."""
    turns: dict[str, list[int]] = defaultdict(list)
    previous: dict[str, str] = {}
    for conversation, seq, role in rows:
        if role == "business" and previous.get(conversation) != "business":
            turns[conversation].append(seq)
        previous[conversation] = role
    totals: dict[str, float] = {}
    for conversation, starts in turns.items():
        outcome = outcomes.get(conversation)
        total = 0.0
        if outcome is not None:
            before = [s for s in starts if s <= outcome]
            for index in range(len(before)):
                total += GAMMA ** (len(before) - 1 - index)
        totals[conversation] = total
    return totals


def read_rows(engine: Engine) -> list[tuple[str, int, str]]:
    """Every message's (conversation, seq, role), in order: one read of the table."""
    with engine.connect() as connection:
        query = text(
            "SELECT conversation_id, seq, role FROM messages ORDER BY conversation_id, seq"
        )
        return [(r[0], r[1], r[2]) for r in connection.execute(query)]


def measure(url: str, conversations: int) -> dict[str, float]:
    engine = make_engine(url)
    with engine.begin() as connection:
        for statement in filter(str.strip, FILL.split(";")):
            connection.execute(text(statement), {"n": conversations, "per": PER_CONVERSATION})
    ids = [f"c{i}" for i in range(1, conversations + 1)]
    factory = make_session_factory(engine)

    started = time.perf_counter()
    with session_scope(factory) as session:
        sql_rows = decision_returns(session, conversation_ids=ids, gamma=GAMMA)
    sql_seconds = time.perf_counter() - started

    started = time.perf_counter()
    read_rows(engine)
    scan_seconds = time.perf_counter() - started
    started = time.perf_counter()
    rows = read_rows(engine)
    with engine.connect() as connection:
        outcomes = {
            r[0]: r[1]
            for r in connection.execute(
                text("SELECT conversation_id, MIN(seq) FROM outcomes GROUP BY conversation_id")
            )
        }
    loop_totals = python_returns(rows, outcomes)
    loop_seconds = time.perf_counter() - started
    engine.dispose()

    sql_totals: dict[str, float] = defaultdict(float)
    for row in sql_rows:
        sql_totals[str(row["conversation_id"])] += float(row["ret"])  # type: ignore[arg-type]
    mismatched = [c for c in ids if abs(sql_totals[c] - loop_totals.get(c, 0.0)) > 1e-9]
    if mismatched:
        raise RuntimeError(f"SQL and loop disagree on {len(mismatched)} conversations")
    return {"sql": sql_seconds, "loop": loop_seconds, "scan": scan_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    figures = []
    for messages in args.sizes:
        name = f"outcomeloop_returns_{uuid.uuid4().hex[:8]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        try:
            upgrade(url)
            t = measure(url, messages // PER_CONVERSATION)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        per = {k: v / messages * 1e6 for k, v in t.items()}
        print(
            f"{messages:>9} messages: returns query {t['sql']:.2f} s ({per['sql']:.1f} us/msg), "
            f"Python loop {t['loop']:.2f} s ({per['loop']:.1f}), one read of the rows "
            f"{t['scan']:.2f} s ({per['scan']:.1f}); query / loop {t['sql'] / t['loop']:.2f}, "
            f"query / read {t['sql'] / t['scan']:.2f}",
            flush=True,
        )
        figures.append({"messages": messages, **{k: round(v, 3) for k, v in t.items()}})
    admin.dispose()
    if args.results:
        append_result(args.results, "bench_returns", {"sizes": figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
