"""Sustained mixed load against the real API on Postgres, optionally with a fault, then proof that
every acknowledged write is stored exactly once.

    python -m tests.reliability.load [--clients 16] [--seconds 180] [--fault postgres-restart]

Starts the API (`outcomeloop serve`, one process) on a fresh Postgres database with a policy on
a tiny random model (so that suggestions are real generations but cheap), then runs `--clients`
simulated businesses for `--seconds`: each conversation is created, gets a customer message, a
suggestion (every `--suggest-every` conversations), the business's reply (linked to the
suggestion), an outcome (every other conversation) and a close. Every write carries an
idempotency key and is retried as a careful client would (same key, on a transport error or a
5xx, with backoff, for up to a minute). What the server acknowledged (2xx) goes into a ledger.

`--fault postgres-restart` restarts the PostgreSQL cluster a third of the way in (needs root:
`pg_ctlcluster ... restart`). Afterwards the ledger is compared with the database: every
acknowledged conversation, message and outcome must be there exactly once (lost = 0,
duplicated = 0), and every acknowledged close must have closed its conversation.

Prints requests, duration, throughput, the status codes seen, retries, writes that failed for
good, and the comparison; exits 1 if anything acknowledged is missing or duplicated.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select

from tests.reliability import TinyWorld, tiny_world


@dataclass
class Ledger:
    """What the server acknowledged, and what happened on the way."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    conversations: dict[str, str] = field(default_factory=dict)  # client id -> server id
    messages: list[tuple[str, str]] = field(default_factory=list)  # (conversation, client id)
    outcomes: list[tuple[str, str]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    suggestions: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # writes given up on, by kind
    requests: int = 0


def call(
    http: httpx.Client, ledger: Ledger, kind: str, method: str, url: str, body: dict[str, Any]
) -> httpx.Response | None:
    """One write, retried with the same body (and so the same idempotency key) on a transport
    error or a 5xx for up to 60 s; None if it never succeeded."""
    deadline = time.monotonic() + 60
    delay = 0.1
    while True:
        with ledger.lock:
            ledger.requests += 1
        try:
            response = http.request(method, url, json=body)
            status = str(response.status_code)
        except httpx.TransportError as exc:
            response, status = None, type(exc).__name__
        with ledger.lock:
            ledger.statuses[status] += 1
        if response is not None and response.status_code < 500:
            if response.status_code >= 400:
                with ledger.lock:
                    ledger.failed[f"{kind} {response.status_code}"] += 1
                return None
            return response
        if time.monotonic() > deadline:
            with ledger.lock:
                ledger.failed[f"{kind} gave up"] += 1
            return None
        with ledger.lock:
            ledger.retries += 1
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def business(
    base_url: str, key: str, client: int, stop: threading.Event, ledger: Ledger, every: int
) -> None:
    rng = random.Random(client)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
        n = 0
        while not stop.is_set():
            n += 1
            external = f"load-{client}-{n}"
            created = call(
                http,
                ledger,
                "create",
                "POST",
                "/v1/conversations",
                {"client_conversation_id": external, "metadata": {"client": client}},
            )
            if created is None:
                continue
            cid = created.json()["id"]
            with ledger.lock:
                ledger.conversations[external] = cid
            base = f"/v1/conversations/{cid}"
            sent = call(
                http,
                ledger,
                "message",
                "POST",
                f"{base}/messages",
                {
                    "role": "customer",
                    "text": f"customer {client} asks {n}",
                    "client_message_id": "c1",
                },
            )
            if sent is not None:
                with ledger.lock:
                    ledger.messages.append((cid, "c1"))
            suggestion_id = None
            if n % every == 0:
                suggested = call(http, ledger, "suggestion", "POST", f"{base}/suggestions", {})
                if suggested is not None and suggested.json().get("suggestion_id"):
                    suggestion_id = suggested.json()["suggestion_id"]
                    with ledger.lock:
                        ledger.suggestions += 1
            reply: dict[str, Any] = {
                "role": "business",
                "text": f"business {client} answers {n}",
                "client_message_id": "b1",
            }
            if suggestion_id is not None:
                reply["suggestion_id"] = suggestion_id
            if call(http, ledger, "message", "POST", f"{base}/messages", reply) is not None:
                with ledger.lock:
                    ledger.messages.append((cid, "b1"))
            won = rng.random() < 0.5
            if (
                won
                and call(
                    http, ledger, "outcome", "POST", f"{base}/outcome", {"client_event_id": "o1"}
                )
                is not None
            ):
                with ledger.lock:
                    ledger.outcomes.append((cid, "o1"))
            reason = "outcome" if won else "customer_left"
            if call(http, ledger, "close", "POST", f"{base}/close", {"reason": reason}) is not None:
                with ledger.lock:
                    ledger.closed.append(cid)


def restart_postgres() -> float:
    """Restart the local cluster; seconds until it accepts connections again."""
    version = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(x) for x in v.split(".")])[
        -1
    ]
    started = time.monotonic()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True
    )
    while subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"], check=False).returncode != 0:
        time.sleep(0.1)
    return time.monotonic() - started


def verify(url: str, ledger: Ledger) -> dict[str, int]:
    """Lost and duplicated acknowledged writes, by kind, read straight from the database."""
    from services.conversations.models import Conversation, Message, Outcome

    engine = create_engine(url)
    report: Counter[str] = Counter()
    with engine.connect() as db:
        rows = db.execute(
            select(Conversation.external_id, func.count(), func.min(Conversation.id))
            .where(Conversation.business_id == "load")
            .group_by(Conversation.external_id)
        ).all()
        stored = {r[0]: (r[1], r[2]) for r in rows}
        for external, cid in ledger.conversations.items():
            count, stored_id = stored.get(external, (0, None))
            report["conversations lost"] += count == 0
            report["conversations duplicated"] += count > 1
            report["conversations other id"] += count == 1 and stored_id != cid
        messages = Counter(
            (r[0], r[1])
            for r in db.execute(select(Message.conversation_id, Message.client_message_id))
        )
        for key in ledger.messages:
            report["messages lost"] += messages[key] == 0
            report["messages duplicated"] += messages[key] > 1
        outcomes = Counter(
            (r[0], r[1]) for r in db.execute(select(Outcome.conversation_id, Outcome.client_id))
        )
        for key in ledger.outcomes:
            report["outcomes lost"] += outcomes[key] == 0
            report["outcomes duplicated"] += outcomes[key] > 1
        status = dict(db.execute(select(Conversation.id, Conversation.status)).all())
        for cid in ledger.closed:
            report["closes lost"] += status.get(cid) != "closed"
    engine.dispose()
    return dict(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--suggest-every", type=int, default=3)
    parser.add_argument("--fault", choices=["none", "postgres-restart"], default="none")
    args = parser.parse_args(argv)
    with tiny_world("load") as world:
        return run(args, world)


def run(args: argparse.Namespace, world: TinyWorld) -> int:
    from services.db import make_engine, make_session_factory, session_scope
    from services.experiments.service import ArmSpec, create_experiment
    from services.policies.models import PolicyStatus
    from services.policies.service import register_policy
    from services.tenants.models import Role
    from services.tenants.service import create_api_key
    from tests.server import free_port, wait_healthy

    engine = make_engine(world.url)
    with session_scope(make_session_factory(engine)) as session:
        key = create_api_key(session, role=Role.BUSINESS, business_id="load")
        register_policy(
            session,
            policy_id="pi0-load",
            base_model=str(world.model),
            adapter_uri=str(world.adapter),
            status=PolicyStatus.APPROVED,
        )
        create_experiment(
            session, name="load", business_id="load", arms=[ArmSpec("control", "pi0-load", 1.0)]
        )
    engine.dispose()
    port = free_port()
    log = world.work / "server.log"
    env = {
        **os.environ,
        "OUTCOMELOOP_DATABASE_URL": world.url,
        "OUTCOMELOOP_DATA_DIR": str(world.work),
        "OUTCOMELOOP_BASE_MODEL": str(world.model),
        "OUTCOMELOOP_MAX_NEW_TOKENS": "8",
        "OUTCOMELOOP_LOG_LEVEL": "WARNING",
        "OUTCOMELOOP_DB_POOL_SIZE": str(args.clients),
    }
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "services", "serve", "--port", str(port)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(process, f"{base_url}/healthz", log, timeout=120)
        ledger = Ledger()
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=business, args=(base_url, key, c, stop, ledger, args.suggest_every)
            )
            for c in range(args.clients)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        if args.fault == "postgres-restart":
            time.sleep(args.seconds / 3)
            downtime = restart_postgres()
            print(f"postgres restarted: accepting connections again after {downtime:.1f} s")
            time.sleep(max(0.0, args.seconds - (time.monotonic() - started)))
        else:
            time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    report = verify(world.url, ledger)
    acknowledged = (
        len(ledger.conversations) + len(ledger.messages) + len(ledger.outcomes) + len(ledger.closed)
    )
    errors = sum(v for s, v in ledger.statuses.items() if not s.startswith("2"))
    print(
        f"clients {args.clients}, {elapsed:.0f} s, fault {args.fault}: {ledger.requests} "
        f"requests ({ledger.requests / elapsed:.1f}/s), {ledger.suggestions} suggestions; "
        f"statuses {dict(sorted(ledger.statuses.items()))}; non-2xx or transport errors "
        f"{errors} ({errors / max(ledger.requests, 1):.2%}); retries {ledger.retries}; "
        f"writes given up {dict(ledger.failed) or 0}"
    )
    print(
        f"acknowledged writes {acknowledged}: {len(ledger.conversations)} conversations, "
        f"{len(ledger.messages)} messages, {len(ledger.outcomes)} outcomes, "
        f"{len(ledger.closed)} closes; in the database: {report}"
    )
    bad = {k: v for k, v in report.items() if v}
    print("events lost or duplicated: 0" if not bad else f"FAILED: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
