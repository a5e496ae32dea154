"""One typed, validated config per step: the jobs API's request models are generated from the
config dataclasses, refuse bad values by name (422, never 500), publish their schema, and the
improvement samples at the temperature and top_p the policy is served with."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.db import make_engine, make_session_factory, session_scope
from services.errors import Conflict, Invalid
from services.experiments.service import ArmSpec, create_experiment
from services.iterations import service
from services.iterations.pipeline_config import PipelineConfig
from services.iterations.schemas import (
    ALGORITHMS,
    REQUEST_MODELS,
    iteration_request_schema,
    parse_iteration_request,
)
from services.iterations.triggers import maybe_start_iteration
from services.migrate import upgrade
from services.policies.models import PolicyStatus
from services.policies.service import register_policy
from services.settings import Settings
from tests.conftest import Store, auth
from tests.iterations.scenario import write_policy_logs
from workers.learning.config_build import API_NAMES, IMPROVEMENT_CONFIGS
from workers.learning.configs import QFitConfig
from workers.learning.returns import ReturnsConfig
from workers.runner import ThreadRunner


def _policy(store: Store) -> str:
    policy = f"p-{uuid.uuid4().hex[:8]}"
    with session_scope(store.factory) as session:
        register_policy(
            session,
            policy_id=policy,
            base_model="/m",
            adapter_uri="/a",
            status=PolicyStatus.APPROVED,
        )
    return policy


def _config_fields(config: type[Any]) -> dict[str, Any]:
    return {f.name: f for f in fields(config)}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_request_models_are_generated_from_the_configs(algorithm: str) -> None:
    model = REQUEST_MODELS[algorithm]
    hyper = model.model_fields["hyperparameters"].annotation
    data = model.model_fields["data"].annotation
    assert hyper is not None and data is not None
    config = IMPROVEMENT_CONFIGS[algorithm]
    api_names = {field: api for api, field in API_NAMES[algorithm].items()}
    for name, f in _config_fields(config).items():
        generated = hyper.model_fields[name]
        if algorithm == "dmpo" and name == "gamma":  # the iteration's one gamma fills it
            assert generated.description and "DMPO's turn weights" in generated.description
            continue
        assert generated.description and f.metadata["help"] in generated.description, name
        assert generated.alias == api_names.get(name)
        if name not in ("temperature", "top_p"):  # filled from the served values
            assert generated.default == f.default, name
    assert set(hyper.model_fields) == set(_config_fields(config)) | {"gamma", "q"}
    q = hyper.model_fields["q"].annotation
    assert q is not None and set(q.model_fields) == set(_config_fields(QFitConfig))
    expected = set(_config_fields(ReturnsConfig)) | set(_config_fields(PipelineConfig))
    assert set(data.model_fields) == expected
    for name, f in {**_config_fields(ReturnsConfig), **_config_fields(PipelineConfig)}.items():
        assert data.model_fields[name].description == f.metadata["help"], name
        if f.default is not MISSING:
            assert data.model_fields[name].default == f.default, name


def test_pipeline_config_checks_its_ranges() -> None:
    assert PipelineConfig().ab_weight == 0.5
    for bad in (
        {"eval_fraction": 0.0},
        {"eval_fraction": 1.0},
        {"max_prompts": 0},
        {"rank_floor": 1.5},
        {"ab_weight": 1.0},
        {"ab_weight": math.nan},
    ):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            PipelineConfig(**bad)


@pytest.fixture
def api(sqlite_store: Store) -> Iterator[TestClient]:
    runner = ThreadRunner(sqlite_store.settings, sqlite_store.factory)
    with TestClient(create_app(sqlite_store.settings, runner=runner)) as client:
        yield client


NAN = float("nan")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"hyperparameters": {"n_epochs": 1.5}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 1e308}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"beta": "0.1"}}, "hyperparameters.beta"),
        ({"hyperparameters": {"beta": NAN}}, "hyperparameters.beta"),
        ({"hyperparameters": {"learning_rate": math.inf}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"q": "x"}}, "hyperparameters.q"),
        ({"hyperparameters": {"q": {"kind": "forest"}}}, "hyperparameters.q.kind"),
        ({"hyperparameters": {"q": {"epochs": 0}}}, "epochs must be positive"),
        ({"hyperparameters": {"beta": -1}}, "beta must not be negative"),
        ({"hyperparameters": {"minibatch_size": 64}}, "minibatch_size (64) exceeds"),
        ({"hyperparameters": {"colour": 1}}, "hyperparameters.colour"),
        ({"data": {"max_prompts": "abc"}}, "data.max_prompts"),
        ({"data": {"max_prompts": 0}}, "max_prompts must be at least 1"),
        ({"data": {"eval_fraction": [1]}}, "data.eval_fraction"),
        ({"data": {"ab_weight": 2}}, "ab_weight must be in (0, 1)"),
        ({"data": {"rank_floor": NAN}}, "data.rank_floor"),
        ({"data": {"override_gate": "yes"}}, "data.override_gate"),
        ({"data": {"gamma": 2}}, "gamma must be in (0, 1]"),
        ({"data": {"sources": ["everything"]}}, "data.sources.0"),
        ({"data": {"colour": "red"}}, "data.colour"),
        ({"hyperparameters": {"gamma": 0.9}, "data": {"gamma": 0.8}}, "gamma"),
        ({"algorithm": "sft"}, "algorithm must be one of ppo, rloo, grpo"),
        ({"algorithm": 3}, "algorithm must be one of"),
        ({"parent_policy_id": 7}, "parent_policy_id"),
        ({"algorithm": "dpo", "hyperparameters": {"relations": ["accepted"]}}, "relations must"),
        ({"algorithm": "dpo", "hyperparameters": {"outcome": "won"}}, "outcome must be one of"),
        ({"algorithm": "dpo", "hyperparameters": {"temperature": 0.7}}, "dpo.hyperparameters.temp"),
        ({"algorithm": "dmpo", "hyperparameters": {"n_epochs": 0}}, "n_epochs must be positive"),
        (
            {"algorithm": "dmpo", "hyperparameters": {"opening_similarity": 2}},
            "opening_similarity must be in [0, 1]",
        ),
        ({"algorithm": "dmpo", "hyperparameters": {"gamma": 0}}, "gamma must be in (0, 1]"),
    ],
)
def test_bad_values_are_422_naming_the_field(
    api: TestClient, sqlite_store: Store, body: dict[str, Any], field: str
) -> None:
    operator = sqlite_store.operator_key()
    response = api.post(
        "/v1/iterations",
        headers={**auth(operator), "Content-Type": "application/json"},
        # Python's JSON writes NaN and Infinity, as some clients do.
        content=json.dumps({"parent_policy_id": _policy(sqlite_store), **body}),
    )
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["message"]


def test_rloo_has_its_own_names_for_epochs_and_batches(
    api: TestClient, sqlite_store: Store
) -> None:
    operator = sqlite_store.operator_key()
    response = api.post(
        "/v1/iterations",
        headers=auth(operator),
        json={"algorithm": "rloo", "hyperparameters": {"cliprange": 0.1}},
    )
    assert response.status_code == 422 and "rloo.hyperparameters.cliprange" in response.text


def test_the_schema_is_published(api: TestClient, sqlite_store: Store) -> None:
    operator = sqlite_store.operator_key()
    _, business = sqlite_store.business_key()
    assert api.get("/v1/iterations/schema", headers=auth(business)).status_code == 403
    published = api.get("/v1/iterations/schema", headers=auth(operator))
    assert published.status_code == 200
    assert published.json() == iteration_request_schema()
    defs = published.json()["$defs"]
    ppo = defs["PPOHyperparameters"]["properties"]
    help_of = _config_fields(IMPROVEMENT_CONFIGS["ppo"])
    assert ppo["n_epochs"]["description"] == help_of["n_ppo_epochs"].metadata["help"]
    assert ppo["cliprange"]["default"] == 0.2 and ppo["n_epochs"]["type"] == "integer"
    assert "served temperature" in ppo["temperature"]["description"]
    assert defs["RLOOHyperparameters"]["properties"]["batch_size"]["description"]
    data = defs["IterationData"]["properties"]
    assert (
        data["ab_weight"]["description"]
        == _config_fields(PipelineConfig)["ab_weight"].metadata["help"]
    )
    assert data["sources"]["items"]["enum"] and data["rank_floor"]["anyOf"]
    openapi = api.get("/openapi.json").json()
    body = openapi["paths"]["/v1/iterations"]["post"]["requestBody"]["content"]
    refs = {item["$ref"] for item in body["application/json"]["schema"]["oneOf"]}
    assert refs == {f"#/components/schemas/{a.upper()}IterationCreate" for a in ALGORITHMS}
    assert "QFitHyperparameters" in openapi["components"]["schemas"]


def test_iteration_endpoints_without_a_runner_answer_503(sqlite_store: Store) -> None:
    """On the embedded default the steps run in the API process: an app built without a runner
    says how to start one, and stores nothing."""
    assert sqlite_store.settings.runner == "inline"
    operator = sqlite_store.operator_key()
    with TestClient(create_app(sqlite_store.settings)) as client:
        before = client.get("/v1/iterations", headers=auth(operator)).json()
        response = client.post(
            "/v1/iterations",
            headers=auth(operator),
            json={"parent_policy_id": _policy(sqlite_store)},
        )
        assert response.status_code == 503
        assert "outcomeloop serve" in response.json()["error"]["message"]
        assert "OUTCOMELOOP_TASK_RUNNER=celery" in response.json()["error"]["message"]
        for action in ("approve", "retry"):
            assert (
                client.post(
                    f"/v1/iterations/x/{action}", headers=auth(operator), json={}
                ).status_code
                == 503
            )
        assert client.get("/v1/iterations", headers=auth(operator)).json() == before


# -- sampling as served ----------------------------------------------------------------------


def _create(store: Store, settings: Settings, **hyper: Any) -> dict[str, Any]:
    request = parse_iteration_request(
        {"hyperparameters": hyper, "parent_policy_id": _policy(store)}
    )
    with session_scope(store.factory) as session:
        configs: dict[str, Any] = service.create_iteration(
            session, settings=settings, request=request
        ).configs
        return configs


def test_improvement_samples_at_the_served_temperature_and_top_p(store: Store) -> None:
    served = store.settings.model_copy(update={"temperature": 0.7, "top_p": 0.95})
    improve = _create(store, served)["improve"]
    assert (improve["temperature"], improve["top_p"]) == (0.7, 0.95)
    again = _create(store, served, temperature=0.7, top_p=0.95)["improve"]
    assert (again["temperature"], again["top_p"]) == (0.7, 0.95)
    with pytest.raises(
        Invalid, match=r"hyperparameters.temperature: 1.0 .* served temperature 0.7"
    ):
        _create(store, served, temperature=1.0)
    with pytest.raises(Invalid, match=r"top_p: 1.0 is not the served top_p 0.95"):
        _create(store, served, top_p=1.0)


def test_a_greedy_policy_cannot_be_improved(store: Store) -> None:
    greedy = store.settings.model_copy(update={"temperature": 0.0})
    with pytest.raises(Conflict, match="sampling policy"):
        _create(store, greedy)


@pytest.mark.parametrize("algorithm", ["dmpo", "dpo"])
def test_offline_steps_sample_nothing_so_a_greedy_policy_may_run_them(
    store: Store, algorithm: str
) -> None:
    greedy = store.settings.model_copy(update={"temperature": 0.0})
    with session_scope(store.factory) as session:
        request = parse_iteration_request(
            {"algorithm": algorithm, "parent_policy_id": _policy(store)}
        )
        iteration = service.create_iteration(session, settings=greedy, request=request)
        assert "temperature" not in iteration.configs["improve"]
        assert iteration.configs["improve"]["n_epochs"] == IMPROVEMENT_CONFIGS[algorithm]().n_epochs


def test_the_api_refuses_another_temperature_than_served(sqlite_store: Store) -> None:
    operator = sqlite_store.operator_key()
    for settings, status, words in [
        (sqlite_store.settings, 422, ["hyperparameters.temperature", "0.7"]),
        (sqlite_store.settings.model_copy(update={"temperature": 0.0}), 409, ["sampling"]),
    ]:
        runner = ThreadRunner(settings, sqlite_store.factory)
        with TestClient(create_app(settings, runner=runner)) as client:
            hyper = {"temperature": 1.0} if status == 422 else {}
            response = client.post(
                "/v1/iterations",
                headers=auth(operator),
                json={"hyperparameters": hyper, "parent_policy_id": _policy(sqlite_store)},
            )
        assert response.status_code == status, response.text
        assert all(word in response.json()["error"]["message"] for word in words)


# -- beat goes through the same validation ---------------------------------------------------


@pytest.fixture
def fresh_store(tmp_path: Path) -> Iterator[Store]:
    """A store of its own: beat looks at every iteration and conversation in it."""
    url = f"sqlite:///{tmp_path / 'beat.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    settings = Settings(database_url=url, data_dir=tmp_path, beat_min_new_conversations=2)
    yield Store("sqlite", settings, engine, make_session_factory(engine))
    engine.dispose()


def test_beat_starts_iterations_with_the_served_sampling(fresh_store: Store) -> None:
    business, policy = "beat-biz", "beat-pi0"
    with session_scope(fresh_store.factory) as session:
        register_policy(
            session,
            policy_id=policy,
            base_model="/m",
            adapter_uri="/a",
            status=PolicyStatus.APPROVED,
        )
    write_policy_logs(fresh_store, business, policy, 4)
    with session_scope(fresh_store.factory) as session:
        create_experiment(
            session, name="pi0", business_id=None, arms=[ArmSpec("control", policy, 1.0)]
        )
    greedy = fresh_store.settings.model_copy(update={"temperature": 0.0})
    with session_scope(fresh_store.factory) as session:
        assert maybe_start_iteration(session, settings=greedy) is None, "greedy: nothing starts"
    with session_scope(fresh_store.factory) as session:
        iteration_id = maybe_start_iteration(session, settings=fresh_store.settings)
        assert iteration_id is not None
        it = service.get_iteration(session, iteration_id=iteration_id)
        assert it.trigger == "beat" and it.parent_policy_id == policy
        assert it.configs["improve"]["temperature"] == fresh_store.settings.temperature
        assert it.configs["pipeline"] == {
            "eval_fraction": 0.2,
            "max_prompts": 64,
            "rank_floor": None,
            "ab_weight": 0.5,
            "check_samples": 4,
            "check_conversations": 24,
            "override_gate": False,
        }
