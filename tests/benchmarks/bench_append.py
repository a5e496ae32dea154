"""Append throughput on Postgres: events/s with N concurrent clients, against baselines.

    python -m tests.benchmarks.bench_append [--clients 32] [--seconds 20] [--workers 2]
        [--results tests/benchmarks/results.jsonl]

Starts the real API (uvicorn subprocess, `--workers` processes) on a fresh Postgres database,
then drives it with concurrent asyncio clients. Two baselines, measured in the same run with
the same number of clients: GET /healthz (one trivial database round trip through the API: how
much of the server's request capacity an append costs) and pgbench running single-row INSERTs
straight into Postgres (the practical limit of logging on this machine). Two shapes: every
client on its own conversation, and all clients on one hot conversation (they serialise on its
row lock). With --results, one JSON line (machine, date, commit, figures) is appended there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from services.db import make_engine, make_session_factory, session_scope
from services.migrate import upgrade
from services.tenants.models import Role
from services.tenants.service import create_api_key
from tests.benchmarks.results import append_result
from tests.server import free_port

ADMIN_URL = os.environ.get(
    "OUTCOMELOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


async def _drive(base_url: str, key: str, clients: int, seconds: float, shape: str) -> float:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=60
    ) as http:
        conversation_ids: list[str] = []
        if shape != "healthz":
            count = 1 if shape == "hot" else clients
            for _ in range(count):
                response = await http.post("/v1/conversations", json={})
                conversation_ids.append(response.json()["id"])
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker(n: int) -> None:
            nonlocal done
            j = 0
            while time.perf_counter() < deadline:
                if shape == "healthz":
                    response = await http.get("/healthz")
                else:
                    cid = conversation_ids[n % len(conversation_ids)]
                    response = await http.post(
                        f"/v1/conversations/{cid}/messages",
                        json={
                            "role": "customer",
                            "text": f"client {n} message {j}",
                            "client_message_id": f"{n}-{j}",
                        },
                    )
                if response.status_code >= 400:
                    raise RuntimeError(f"{response.status_code}: {response.text}")
                done += 1
                j += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(clients)))
        return done / (time.perf_counter() - started)


def pgbench_inserts(url: str, clients: int, seconds: float) -> float:
    """Single-row INSERT transactions per second by pgbench, `clients` connections."""
    parsed = make_url(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE bench_insert (id bigserial PRIMARY KEY, body text)"))
    engine.dispose()
    script = Path(tempfile.mkdtemp()) / "insert.sql"
    script.write_text("INSERT INTO bench_insert (body) VALUES ('customer message text');\n")
    result = subprocess.run(
        [
            "pgbench", "-n", "-h", parsed.host or "127.0.0.1", "-p", str(parsed.port or 5432),
            "-U", parsed.username or "postgres", "-c", str(clients), "-j", str(os.cpu_count() or 1),
            "-T", str(int(seconds)), "-f", str(script), parsed.database or "postgres",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", result.stdout)
    if match is None:
        raise RuntimeError(f"no tps in pgbench's output:\n{result.stdout}\n{result.stderr}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()

    name = f"outcomeloop_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    process = None
    try:
        upgrade(url)
        engine = make_engine(url)
        with session_scope(make_session_factory(engine)) as session:
            key = create_api_key(session, role=Role.BUSINESS, business_id="bench")
        engine.dispose()
        port = free_port()
        log = Path(tempfile.mkdtemp()) / "server.log"
        env = {
            **os.environ,
            "OUTCOMELOOP_DATABASE_URL": url,
            "OUTCOMELOOP_LOG_LEVEL": "WARNING",
            "OUTCOMELOOP_DB_POOL_SIZE": str(args.clients),
        }
        with log.open("w") as handle:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services",
                    "serve",
                    "--port",
                    str(port),
                    "--workers",
                    str(args.workers),
                ],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        base_url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError(log.read_text())

        asyncio.run(_drive(base_url, key, args.clients, 2.0, "spread"))  # warm up
        results = {}
        for shape in ("healthz", "spread", "hot"):
            results[shape] = asyncio.run(_drive(base_url, key, args.clients, args.seconds, shape))
        print(
            f"clients={args.clients} workers={args.workers} seconds={args.seconds} "
            f"cores={os.cpu_count()}"
        )
        print(f"baseline GET /healthz:            {results['healthz']:8.1f} req/s")
        process.terminate()
        process.wait(timeout=15)
        process = None
        results["pgbench"] = pgbench_inserts(url, args.clients, args.seconds)
        print(f"baseline pgbench single-row INSERT: {results['pgbench']:8.1f} tps (no API)")
        for shape, label in (("spread", "own conversation each"), ("hot", "one hot conversation")):
            print(
                f"append, {label:<24} {results[shape]:8.1f} events/s "
                f"(ratio to /healthz {results[shape] / results['healthz']:.2f}, "
                f"to pgbench {results[shape] / results['pgbench']:.3f})"
            )
        if args.results:
            append_result(
                args.results,
                "bench_append",
                {"clients": args.clients, "workers": args.workers, "seconds": args.seconds}
                | {k: round(v, 1) for k, v in results.items()},
            )
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=15)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
