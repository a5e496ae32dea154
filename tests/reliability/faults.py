"""Fault scenarios, each scripted, each checking that nothing acknowledged is lost and that the
system recovers by itself.

    python -m tests.reliability.faults redis-restart | redis-restart-queued
    python -m tests.reliability.load --fault postgres-restart     (Postgres restarted under load)
    python -m tests.reliability.load --fault vllm-kill [--on-backend-error error|abstain]
                                                    (the vLLM server killed under load)

redis-restart: a policy iteration runs on a real Celery worker and a real beat (Postgres store,
tiny model, short leases); while its improvement step runs, Redis is shut down without saving
and started again, empty: the queued step messages are gone. The worker reconnects; the step in
progress finishes and queues the next; a message lost with Redis is sent again by beat's sweep
(`stalled_iterations`: queued and untouched for longer than the visibility timeout). Passes when
the iteration reaches awaiting_approval with exactly one candidate policy, and prints how long
recovery took. redis-restart-queued restarts Redis while the first step's message waits for
a worker (none runs yet): that message is lost, and only the sweep brings the iteration back.
Needs root (it restarts the local Redis as deploy/dev/ensure-services.sh starts
it) and stops nothing else.

(A Celery worker killed mid-improve, and resumed by another with exactly one candidate, is a CI
test: tests/iterations/test_celery.py. A vLLM server that dies: under load in load.py, and the
backend's fast 503 and recovery against stub replicas in tests/generation/test_vllm_replicas.py.)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from types import SimpleNamespace

from sqlalchemy import func, select

from tests.reliability import TinyWorld, tiny_world

REDIS_DB = 14


def restart_redis() -> float:
    """Shut the local Redis down without saving and start it again, empty; seconds down."""
    started = time.monotonic()
    subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"], check=False
    )
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
    )
    while (
        subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", "6379", "ping"], capture_output=True, check=False
        ).returncode
        != 0
    ):
        time.sleep(0.1)
    return time.monotonic() - started


def redis_restart(moment: str = "running") -> int:
    """moment "running": Redis restarts while the improvement step runs; "queued": while the
    first step's message waits in Redis for a worker (started only afterwards), so the message
    is lost and only beat's sweep can bring the iteration back."""
    with tiny_world("fault") as world:
        return _redis_restart(moment, world)


def _redis_restart(moment: str, world: TinyWorld) -> int:
    from services.db import make_engine, make_session_factory, session_scope
    from services.experiments.service import ArmSpec, create_experiment
    from services.iterations import service
    from services.iterations.models import Step
    from services.iterations.runner import CeleryRunner
    from services.iterations.schemas import parse_iteration_request
    from services.policies.models import Policy, PolicyStatus
    from services.policies.service import register_policy
    from services.settings import Settings
    from tests.iterations.scenario import write_policy_logs

    url, work, model, adapter = world.url, world.work, world.model, world.adapter
    redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    lease = 8
    env = {
        **os.environ,
        "OUTCOMELOOP_DATABASE_URL": url,
        "OUTCOMELOOP_REDIS_URL": redis_url,
        "OUTCOMELOOP_DATA_DIR": str(work),
        "OUTCOMELOOP_TASK_RUNNER": "celery",
        "OUTCOMELOOP_CELERY_VISIBILITY_TIMEOUT_S": str(lease),
        "OUTCOMELOOP_STEP_LEASE_S": str(lease),
        "OUTCOMELOOP_BEAT_INTERVAL_S": "3",
        "OUTCOMELOOP_BEAT_MIN_NEW_CONVERSATIONS": "1000000",  # the sweep only, no new iteration
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        settings = Settings(
            database_url=url,
            redis_url=redis_url,
            data_dir=work,
            task_runner="celery",
            celery_visibility_timeout_s=lease,
            step_lease_s=lease,
        )
        factory = make_session_factory(make_engine(url))
        write_policy_logs(SimpleNamespace(factory=factory, settings=settings), "fault", "pi0", 40)
        with session_scope(factory) as session:
            register_policy(
                session,
                policy_id="pi0",
                base_model=str(model),
                adapter_uri=str(adapter),
                status=PolicyStatus.APPROVED,
            )
            create_experiment(
                session, name="pi0", business_id="fault", arms=[ArmSpec("c", "pi0", 1.0)]
            )
        roles = ("worker", "beat") if moment == "running" else ("beat",)

        def start(role: str) -> None:
            command = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                role,
                "--loglevel",
                "INFO",
            ]
            if role == "worker":
                command += [
                    "-Q",
                    "cpu,gpu",
                    "--concurrency",
                    "1",
                    "--without-mingle",
                    "--without-gossip",
                ]
            else:
                command += ["--schedule", str(work / "beat-schedule")]
            log = (work / f"{role}.log").open("w")
            processes.append(
                subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            if role == "worker":
                deadline = time.monotonic() + 120
                while "ready." not in (work / "worker.log").read_text():
                    if time.monotonic() > deadline:
                        raise RuntimeError((work / "worker.log").read_text()[-3000:])
                    time.sleep(0.3)

        for role in roles:
            start(role)
        request = parse_iteration_request(
            {
                "hyperparameters": {
                    "beta": 0.05,
                    "n_epochs": 1,
                    "batch_size": 2,
                    "minibatch_size": 2,
                    "num_updates": 150,
                    "max_new_tokens": 8,
                    "q": {"kind": "head", "max_length": 64, "head_epochs": 200},
                },
                "data": {
                    "business_id": "fault",
                    "max_prompts": 4,
                    "eval_fraction": 0.3,
                    "override_gate": True,
                },
            }
        )
        with session_scope(factory) as session:
            iteration_id = service.create_iteration(session, settings=settings, request=request).id
        CeleryRunner(settings).submit(iteration_id, Step.RETURNS)

        def state() -> tuple[str, str | None]:
            with session_scope(factory) as session:
                it = service.get_iteration(session, iteration_id=iteration_id)
                return it.status, it.current_step

        if moment == "running":
            while state() != ("running", "improve"):
                status, step = state()
                if status in ("failed", "awaiting_approval"):
                    raise RuntimeError(f"reached {status} at {step} before the fault")
                time.sleep(0.2)
        down = restart_redis()
        faulted = time.monotonic()
        where = "while improve ran" if moment == "running" else "with the first step queued"
        print(f"redis restarted empty {where} ({down:.1f} s down)", flush=True)
        if moment == "queued":
            start("worker")  # the message it would have taken is gone
        while state()[0] not in ("awaiting_approval", "failed", "succeeded"):
            if time.monotonic() - faulted > 600:
                raise RuntimeError(f"no recovery in 10 min: {state()}")
            time.sleep(0.5)
        status, step = state()
        with session_scope(factory) as session:
            it = service.get_iteration(session, iteration_id=iteration_id)
            candidates = session.scalar(
                select(func.count()).select_from(Policy).where(Policy.iteration_id == iteration_id)
            )
            kinds = Counter(e.kind for e in it.events)
            error = it.error
        ok = status == "awaiting_approval" and candidates == 1
        print(
            f"iteration {status} at {step} {time.monotonic() - faulted:.0f} s after the fault; "
            f"candidates {candidates}; events {dict(kinds)}" + (f"; error {error}" if error else "")
        )
        print("recovered by itself, one candidate" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


SCENARIOS = {
    "redis-restart": lambda: redis_restart("running"),
    "redis-restart-queued": lambda: redis_restart("queued"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    args = parser.parse_args(argv)
    return SCENARIOS[args.scenario]()


if __name__ == "__main__":
    sys.exit(main())
