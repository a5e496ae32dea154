"""The `outcomeloop` command line on the embedded default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from services.app import create_app
from services.cli import app
from services.settings import get_settings
from tests.conftest import auth


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("OUTCOMELOOP_DATABASE_URL", raising=False)
    monkeypatch.setenv("OUTCOMELOOP_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_keys_create_prints_a_working_key(embedded: Path) -> None:
    runner = CliRunner()
    business = runner.invoke(app, ["keys", "create", "--business", "acme"])
    operator = runner.invoke(app, ["keys", "create", "--operator"])
    assert business.exit_code == 0 and operator.exit_code == 0, business.output + operator.output
    business_key, operator_key = business.stdout.strip(), operator.stdout.strip()
    assert business_key.startswith("olk_") and business_key != operator_key
    assert (embedded / "outcomeloop.sqlite3").exists()
    with TestClient(create_app(get_settings())) as client:
        created = client.post("/v1/conversations", json={}, headers=auth(business_key))
        assert created.status_code == 201 and created.json()["business_id"] == "acme"
        listed = client.get("/v1/businesses", headers=auth(operator_key))
        assert [b["id"] for b in listed.json()["data"]] == ["acme"]


def test_keys_create_refuses_ambiguous_or_bad_input(embedded: Path) -> None:
    runner = CliRunner()
    both = runner.invoke(app, ["keys", "create", "--business", "acme", "--operator"])
    neither = runner.invoke(app, ["keys", "create"])
    bad_slug = runner.invoke(app, ["keys", "create", "--business", "Acme Inc"])
    assert both.exit_code == neither.exit_code == bad_slug.exit_code == 2
    assert "exactly one" in both.output and "exactly one" in neither.output
    assert "Acme Inc" in bad_slug.output


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--max-prompts", "0"], "max_prompts must be at least 1"),
        (["--beta", "-1"], "beta must not be negative"),
        (["--gamma", "1.5"], "gamma must be in (0, 1]"),
        (["--algorithm", "sft"], "algorithm must be one of ppo, rloo, grpo"),
        (["--q-kind", "forest"], "hyperparameters.q.kind"),
    ],
)
def test_iterate_create_validates_its_options_as_the_api_does(
    embedded: Path, options: list[str], words: str
) -> None:
    result = CliRunner().invoke(app, ["iterate", "create", *options])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    listed = CliRunner().invoke(app, ["iterate", "list"])
    assert listed.exit_code == 0 and "queued" not in listed.output


def test_iterate_create_runs_the_steps_in_this_process(embedded: Path) -> None:
    """The embedded default: the command runs the steps itself and returns when the iteration
    stops (here at once: the business has no conversations)."""
    from services.db import make_engine, make_session_factory, session_scope
    from services.migrate import upgrade
    from services.policies.models import PolicyStatus
    from services.policies.service import register_policy

    settings = get_settings()
    upgrade(settings.sqlalchemy_url)
    with session_scope(make_session_factory(make_engine(settings.sqlalchemy_url))) as session:
        register_policy(
            session, policy_id="p0", base_model="/m", adapter_uri="/a", status=PolicyStatus.APPROVED
        )
    result = CliRunner().invoke(
        app, ["iterate", "create", "--parent", "p0", "--business", "nobody", "--max-prompts", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "failed" in result.output and "no training data" in " ".join(result.output.split())
    import json

    options = ["--parent", "p0", "--business", "nobody", "--max-prompts", "4", "--json"]
    as_json = CliRunner().invoke(app, ["iterate", "create", *options])
    assert as_json.exit_code == 0, as_json.output
    iteration = json.loads(as_json.stdout)  # progress went to stderr
    assert iteration["object"] == "iteration" and iteration["status"] == "failed"


@pytest.mark.parametrize("algorithm", ["dmpo", "dpo"])
def test_iterate_create_runs_an_offline_iteration(
    embedded: Path, algorithm: str, tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    """`iterate create --algorithm dmpo|dpo` on the embedded default runs to a candidate."""
    import json
    from types import SimpleNamespace

    from services.db import make_engine, make_session_factory, session_scope
    from services.migrate import upgrade
    from services.policies.models import PolicyStatus
    from services.policies.service import register_policy
    from tests.iterations.scenario import write_policy_logs

    settings = get_settings()
    upgrade(settings.sqlalchemy_url)
    factory = make_session_factory(make_engine(settings.sqlalchemy_url))
    with session_scope(factory) as session:
        register_policy(
            session,
            policy_id="p0",
            base_model=str(tiny_model),
            adapter_uri=str(tiny_adapters["zero"]),
            status=PolicyStatus.APPROVED,
        )
    write_policy_logs(
        SimpleNamespace(factory=factory, settings=settings), "b", "p0", 40, rewrite=0.5
    )
    options = ["--algorithm", algorithm, "--parent", "p0", "--business", "b", "--n-epochs", "1"]
    result = CliRunner().invoke(
        app, ["iterate", "create", *options, "--batch-size", "2", "--override-gate", "--json"]
    )
    assert result.exit_code == 0, result.output
    iteration = json.loads(result.stdout)
    assert iteration["status"] == "awaiting_approval", iteration["error"]
    assert iteration["algorithm"] == algorithm and iteration["metrics"]["improve_pairs"] >= 1


def test_q_fit_and_score_with_the_lexical_kind(embedded: Path) -> None:
    """`q fit --kind lexical` on imported conversations needs no base model; `q score` then
    ranks a reply that books above one that does not, for the same state."""
    import json
    import random

    rng = random.Random(0)
    filler = ["we", "offer", "a", "free", "quote", "with", "warranty", "and", "see", "you"]
    lines = []
    for c in range(80):
        booked = c % 2 == 0
        messages = []
        for _ in range(3):
            words = [rng.choice(filler) for _ in range(6)] + (["book"] if booked else [])
            messages += [
                {"role": "customer", "text": rng.choice(["Hi there", "What does it cost?"])},
                {"role": "business", "text": " ".join(rng.sample(words, len(words)))},
            ]
        end = "outcome" if booked else "customer_left"
        lines.append(
            {"id": f"c{c}", "business_id": "acme", "messages": messages, "outcome": int(booked),
             "end": end}
        )  # fmt: skip
    data = embedded / "conversations.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    runner = CliRunner()
    assert runner.invoke(app, ["import", str(data)]).exit_code == 0
    # Half held out: with the default tenth (4 of 40 conversations, chosen by their random ids)
    # one run in eight held out a single class and had no AUC (CI caught it). 80 conversations:
    # with 40 the held-out AUC ranged 0.86-1.0 over the random split (CI, stop 21: 0.886);
    # with 80 it was 0.973-1.0 in 10 runs.
    fitted = runner.invoke(
        app,
        [
            "q",
            "fit",
            "--kind",
            "lexical",
            "--eval-fraction",
            "0.5",
            "--output",
            str(embedded / "q"),
        ],
    )
    assert fitted.exit_code == 0, fitted.output
    assert json.loads(fitted.stdout)["all"]["auc"] > 0.9
    state = [{"role": "customer", "text": "What does it cost?"}]
    candidates = embedded / "candidates.jsonl"
    candidates.write_text(
        json.dumps({"id": "a", "messages": state, "response": "a free quote, book now"})
        + "\n"
        + json.dumps({"id": "b", "messages": state, "response": "a free quote, see you"})
        + "\n"
    )
    scored = runner.invoke(
        app,
        [
            "q", "score", "--model", str(embedded / "q"), "--input", str(candidates),
            "--output", str(embedded / "scores.jsonl"),
        ],
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    scores = [json.loads(line) for line in (embedded / "scores.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scores] == ["a", "b"] and scores[0]["q"] > scores[1]["q"]


def test_experiments_results_prints_the_apis_json_and_a_table(embedded: Path) -> None:
    import json

    from services.db import session_scope
    from services.experiments.service import ArmSpec, create_experiment
    from services.policies.models import PolicyStatus
    from services.policies.service import register_policy

    runner = CliRunner()
    operator = runner.invoke(app, ["keys", "create", "--operator"]).stdout.strip()
    with TestClient(create_app(get_settings())) as client:
        factory = client.app.state.session_factory  # type: ignore[attr-defined]
        with session_scope(factory) as session:
            for policy in ("pi0", "pi1"):
                register_policy(
                    session,
                    policy_id=policy,
                    base_model="base",
                    adapter_uri=policy,
                    status=PolicyStatus.APPROVED,
                )
            experiment = create_experiment(
                session,
                name="ab",
                arms=[ArmSpec("control", "pi0", 1.0), ArmSpec("treatment", "pi1", 1.0)],
            ).id
        api = client.get(f"/v1/experiments/{experiment}/results", headers=auth(operator)).json()
    as_json = runner.invoke(app, ["experiments", "results", experiment, "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == api
    table = runner.invoke(app, ["experiments", "results", experiment])
    assert table.exit_code == 0, table.output
    assert "treatment vs control" in table.output and "sample ratio" in table.output
    missing = runner.invoke(app, ["experiments", "results", "nope"])
    assert missing.exit_code == 2 and "experiment nope not found" in missing.output


def test_keys_list_and_revoke_from_the_cli_and_the_api(embedded: Path) -> None:
    import json

    runner = CliRunner()
    business_key = runner.invoke(app, ["keys", "create", "--business", "acme"]).stdout.strip()
    operator_key = runner.invoke(app, ["keys", "create", "--operator"]).stdout.strip()
    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)
    assert [k["role"] for k in listed] == ["operator", "business"]  # newest first
    assert all(business_key not in json.dumps(k) for k in listed)  # never the key itself
    business_id = next(k["id"] for k in listed if k["role"] == "business")
    table = runner.invoke(app, ["keys", "list"])
    assert business_id in table.stdout  # the whole id, even piped
    with TestClient(create_app(get_settings())) as client:
        assert client.post("/v1/conversations", json={}, headers=auth(business_key)).is_success
        mine = client.get("/v1/keys", headers=auth(operator_key)).json()
        operator_id = next(k["id"] for k in mine["data"] if k["role"] == "operator")
        self_revoke = client.post(f"/v1/keys/{operator_id}/revoke", headers=auth(operator_key))
        assert self_revoke.status_code == 409
        revoked = client.post(f"/v1/keys/{business_id}/revoke", headers=auth(operator_key))
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        refused = client.post("/v1/conversations", json={}, headers=auth(business_key))
        assert refused.status_code == 401
        audit = client.get("/v1/audit", headers=auth(operator_key)).json()["data"]
        assert [(e["action"], e["subject_id"]) for e in audit] == [("api_key.revoked", business_id)]
        assert client.get("/v1/keys", headers=auth(business_key)).status_code == 401
    again = runner.invoke(app, ["keys", "revoke", business_id])
    assert again.exit_code == 0  # revoking twice is a no-op
    missing = runner.invoke(app, ["keys", "revoke", "nope"])
    assert missing.exit_code == 2 and "nope not found" in missing.output


def test_lists_and_shows_print_json_for_scripts(embedded: Path) -> None:
    import json

    from services.db import session_scope
    from services.policies.models import PolicyStatus
    from services.policies.service import register_policy

    runner = CliRunner()
    operator = runner.invoke(app, ["keys", "create", "--operator"]).stdout.strip()
    with TestClient(create_app(get_settings())) as client:
        with session_scope(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
            register_policy(
                session,
                policy_id="pi0",
                base_model="b",
                adapter_uri="a",
                status=PolicyStatus.APPROVED,
            )
        created = runner.invoke(
            app, ["experiments", "create", "--name", "ab", "--arm", "control=pi0", "--json"]
        )
        assert created.exit_code == 0, created.output
        experiment = json.loads(created.stdout)
        api = client.get("/v1/experiments", headers=auth(operator)).json()["data"]
        assert [experiment] == api
        policies = client.get("/v1/policies", headers=auth(operator)).json()["data"]
    assert json.loads(runner.invoke(app, ["experiments", "list", "--json"]).stdout) == api
    assert json.loads(runner.invoke(app, ["policies", "list", "--json"]).stdout) == policies
    assert json.loads(runner.invoke(app, ["iterate", "list", "--json"]).stdout) == []
    missing = runner.invoke(app, ["iterate", "show", "nope", "--json"])
    assert missing.exit_code == 2
