"""The Grafana dashboard and the alert rules against a real Prometheus (Debian's package)
scraping a live API under a little traffic: every panel's query and every alert's expression
(its left side: the alert itself only fires on trouble) must return data, not merely parse."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml  # type: ignore[import-untyped]
from sqlalchemy import select

from services.app import create_app
from services.audit import service as audit
from services.db import session_scope
from services.experiments.service import ArmSpec, create_experiment
from services.iterations import service as iterations
from services.iterations.models import Step
from services.iterations.schemas import parse_iteration_request
from services.policies.models import Policy, PolicyStatus
from services.policies.service import register_policy
from tests.conftest import Store, auth
from tests.factories import new_conversation, say
from tests.server import free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/outcomeloop.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
PROMETHEUS = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and os.environ.get("CI") != "true",
    reason="needs Debian's prometheus package (.ci/run installs it)",
)


def panel_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    # The left side of the last comparison: the quantity the alert watches.
    return [(r["alert"], re.split(r"\s[<>]=?\s[\d.]+\s*$", r["expr"])[0]) for r in rules]


def test_the_alert_rules_and_the_prometheus_config_check() -> None:
    assert PROMETHEUS is not None
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(alert_queries()) == 3 and all(q for _, q in alert_queries())


class LiveApi:
    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")  # type: ignore[arg-type]
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Prometheus on a free port; the test writes its scrape target before starting it."""
    port = free_port()
    yield f"http://127.0.0.1:{port}", tmp_path


def _query(base: str, expr: str) -> list[dict[str, object]]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def test_every_panel_and_alert_returns_data_from_a_live_api(
    sqlite_store: Store,
    tiny_model: Path,
    tiny_adapters: dict[str, Path],
    tiny_backend: object,
    prometheus: tuple[str, Path],
) -> None:
    base, workdir = prometheus
    store = sqlite_store
    business, key = store.business_key()
    suffix = uuid.uuid4().hex[:6]
    with session_scope(store.factory) as session:
        for name, adapter in (("control", "zero"), ("treatment", "noisy")):
            register_policy(
                session,
                policy_id=f"{name}-{suffix}",
                base_model=str(tiny_model),
                adapter_uri=str(tiny_adapters[adapter]),
                status=PolicyStatus.APPROVED,
            )
        create_experiment(
            session,
            name="ab",
            business_id=business,
            arms=[ArmSpec(n, f"{n}-{suffix}", 1.0) for n in ("control", "treatment")],
        )
    settings = store.settings.model_copy(update={"temperature": 0.0, "max_new_tokens": 8})
    app = create_app(settings, backend=tiny_backend)  # type: ignore[arg-type]

    def boom() -> None:
        raise RuntimeError("a deliberate crash, for the 5xx panel")

    app.add_api_route("/boom", boom)
    with LiveApi(app) as api:
        config = workdir / "prometheus.yml"
        shutil.copy(ALERTS, workdir / "alerts.yml")
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": ["alerts.yml"],
                    "scrape_configs": [
                        {
                            "job_name": "api",
                            "static_configs": [{"targets": [api.removeprefix("http://")]}],
                        }
                    ],
                }
            )
        )
        log = (workdir / "prometheus.log").open("w")
        process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={base.removeprefix('http://')}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:  # Prometheus up and scraping the API before the traffic starts
                try:
                    if _query(base, 'up{job="api"} == 1'):
                        break
                except (httpx.TransportError, json.JSONDecodeError):
                    pass
                assert process.poll() is None, (workdir / "prometheus.log").read_text()
                assert time.monotonic() < deadline, (workdir / "prometheus.log").read_text()
                time.sleep(0.5)
            # Twice, scrapes between: a series' first sample already holds its first
            # increments, so only what happens after it shows in rate() and increase().
            _traffic(api, key, store, first=True)
            time.sleep(3)
            _traffic(api, key, store, first=False)
            missing = _wait_for_data(base, [*panel_queries(), *alert_queries()], seconds=30)
            assert not missing, missing
            for title, expr in [*panel_queries(), *alert_queries()]:  # shown with pytest -s
                series = [
                    f"{ {k: v for k, v in r['metric'].items() if k not in ('job', 'instance')} }"  # type: ignore[union-attr]
                    f"={float(r['value'][1]):.3g}"  # type: ignore[index]
                    for r in _query(base, expr)
                ]
                print(f"{title}: {'; '.join(series)}")
        finally:
            process.terminate()
            process.wait(timeout=10)
            log.close()


def _traffic(api: str, key: str, store: Store, *, first: bool) -> None:
    client = httpx.Client(base_url=api, timeout=60)
    for i in range(6):
        cid = new_conversation(client, key)  # type: ignore[arg-type]
        say(client, key, cid, "customer", "Do you renovate kitchens?")  # type: ignore[arg-type]
        suggestion = client.post(f"/v1/conversations/{cid}/suggestions", json={}, headers=auth(key))
        assert suggestion.status_code == 201, suggestion.text
        body = suggestion.json()
        text = body["text"] or "We do."
        say(
            client,  # type: ignore[arg-type]
            key,
            cid,
            "business",
            text if i % 2 else text + " Shall we book a visit?",
            suggestion_id=body["suggestion_id"],
        )
        if i % 3 == 0:
            client.post(f"/v1/conversations/{cid}/outcome", json={}, headers=auth(key))
        reason = "outcome" if i % 3 == 0 else "customer_left"
        client.post(f"/v1/conversations/{cid}/close", json={"reason": reason}, headers=auth(key))
    assert client.get("/boom").status_code == 500
    client.close()
    with session_scope(store.factory) as session:  # a guardrail rollback, each round
        audit.record(
            session,
            actor="guardrail",
            action="experiment.rolled_back",
            subject_type="experiment",
            subject_id="x",
        )
    if not first:
        return
    # The pipeline's side: an iteration with a finished step and metrics.
    with session_scope(store.factory) as session:
        policy = session.scalars(select(Policy.id).limit(1)).one()
        request = parse_iteration_request({"algorithm": "ppo", "parent_policy_id": policy})
        iteration_id = iterations.create_iteration(
            session, settings=store.settings, request=request
        ).id
    with session_scope(store.factory) as session:
        iterations.begin_step(
            session, iteration_id=iteration_id, step=Step.RETURNS, worker="w", lease_s=60
        )
    with session_scope(store.factory) as session:
        iterations.finish_step(
            session,
            iteration_id=iteration_id,
            step=Step.RETURNS,
            result={"ok": True},
            metrics={"q_auc": 0.71, "q_rank_corr": 0.2, "check_gain": 0.01},
        )


def _finite(result: list[dict[str, object]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)  # type: ignore[index]


def _wait_for_data(base: str, queries: list[tuple[str, str]], seconds: float) -> list[str]:
    """The queries that returned no finite value within `seconds` (NaN is no data: a ratio of
    counters that did not move)."""
    deadline = time.monotonic() + seconds
    pending = list(queries)
    while pending and time.monotonic() < deadline:
        pending = [(title, expr) for title, expr in pending if not _finite(_query(base, expr))]
        if pending:
            time.sleep(1)
    return [f"{title}: {expr}" for title, expr in pending]
