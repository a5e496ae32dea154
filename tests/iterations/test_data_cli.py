"""`outcomeloop data decisions`: what an iteration would train on, from the pipeline's code path,
on the embedded default (SQLite in DATA_DIR) and on Postgres."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.db import make_engine, make_session_factory, session_scope, utcnow
from services.experiments.service import ArmSpec, create_experiment
from services.iterations.dataset import build_examples
from services.migrate import upgrade
from services.policies.models import PolicyStatus
from services.policies.service import register_policy
from services.settings import get_settings
from services.tenants.service import ensure_business
from tests.conftest import Store
from tests.iterations.scenario import write_policy_logs
from workers.learning.returns import ReturnsConfig

RECORD_KEYS = {
    "conversation_id",
    "decision_index",
    "state",
    "action",
    "source",
    "reward",
    "return",
    "weight",
    "outcome",
}


@pytest.fixture(params=["embedded", "postgres"])
def cli_store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Store]:
    """The store the CLI reaches through the environment, as an operator would configure it."""
    monkeypatch.setenv("OUTCOMELOOP_DATA_DIR", str(tmp_path))
    if request.param == "embedded":
        monkeypatch.delenv("OUTCOMELOOP_DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv("OUTCOMELOOP_DATABASE_URL", request.getfixturevalue("postgres_url"))
    get_settings.cache_clear()
    settings = get_settings()
    upgrade(settings.sqlalchemy_url)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        yield Store(request.param, settings, engine, make_session_factory(engine))
    finally:
        engine.dispose()
        get_settings.cache_clear()


def test_data_decisions_writes_what_the_pipeline_trains_on(
    cli_store: Store, tmp_path: Path
) -> None:
    business = f"cli-{uuid.uuid4().hex[:8]}"
    policy = f"pi0-{business}"
    with session_scope(cli_store.factory) as session:
        ensure_business(session, business_id=business)
        register_policy(
            session,
            policy_id=policy,
            base_model="/nowhere",
            adapter_uri="/nowhere",
            status=PolicyStatus.APPROVED,
        )
        create_experiment(
            session, name="pi0", business_id=business, arms=[ArmSpec("control", policy, 1.0)]
        )
    write_policy_logs(cli_store, business, policy, 30, epsilon=0.2)
    write_policy_logs(cli_store, business, "someone-else", 5, seed=1)
    output = tmp_path / "decisions.jsonl"
    runner = CliRunner()
    result = runner.invoke(
        app, ["data", "decisions", "--output", str(output), "--business", business]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert records and all(set(r) >= RECORD_KEYS for r in records)
    assert {r["source"] for r in records} <= {"policy", "exploration"}
    assert all(0.0 <= r["return"] <= 1.0 and r["weight"] > 0 for r in records)
    assert all(r["state"][-1]["role"] == "customer" for r in records)
    with session_scope(cli_store.factory) as session:
        examples, stats = build_examples(
            session,
            config=ReturnsConfig(business_id=business),
            policy_id=policy,
            cutoff=utcnow() + timedelta(seconds=1),
        )
    # One code path: the same decisions, returns and weights as the pipeline's examples.
    assert sorted(
        (r["conversation_id"], r["action"], r["return"], r["weight"]) for r in records
    ) == sorted((e.conversation_id, e.action, e.ret, e.weight) for e in examples)
    assert stats.by_source["other_arms"]["available"] == 5
    assert "effective sample size" in result.stderr

    everything = runner.invoke(
        app,
        [
            "data",
            "decisions",
            "--output",
            "-",
            "--business",
            business,
            "--sources",
            "policy,other_arms",
            "--all",
        ],
    )
    assert everything.exit_code == 0, everything.output
    rows = [json.loads(line) for line in everything.stdout.splitlines()]
    assert {r["source"] for r in rows} == {"policy", "exploration", "other_arms"}
    assert {r["excluded"] for r in rows if not r["used"]} >= {"source_exploration"}

    bad = runner.invoke(
        app, ["data", "decisions", "--output", "-", "--sources", "policy,everything"]
    )
    assert bad.exit_code == 2 and "everything" in bad.output
