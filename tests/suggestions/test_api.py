"""Suggestions over HTTP from A/B arms on a tiny real model, on SQLite and Postgres."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.db import session_scope
from services.experiments.service import ArmSpec, create_experiment
from services.generation.base import AdapterRef, GenerationRequest, SamplingParams
from services.generation.embedded import EmbeddedBackend
from services.generation.vllm import VllmBackend
from services.policies.models import PolicyStatus
from services.policies.prompt import Turn, build_prompt, system_prompt
from services.policies.service import register_policy
from tests.conftest import Store, auth
from tests.factories import new_conversation, say
from tests.server import free_port


@dataclass
class World:
    client: TestClient
    store: Store
    business: str
    key: str
    operator: str
    policies: dict[str, str]  # arm name -> policy id
    experiment_id: str


def _register(store: Store, base: Path, adapters: dict[str, Path], suffix: str) -> dict[str, str]:
    ids = {"control": f"pi0-{suffix}", "treatment": f"pi1-{suffix}"}
    with session_scope(store.factory) as session:
        register_policy(
            session,
            policy_id=ids["control"],
            base_model=str(base),
            adapter_uri=str(adapters["zero"]),
            status=PolicyStatus.APPROVED,
        )
        register_policy(
            session,
            policy_id=ids["treatment"],
            base_model=str(base),
            adapter_uri=str(adapters["noisy"]),
            parent_id=ids["control"],
            status=PolicyStatus.APPROVED,
        )
    return ids


@pytest.fixture
def world(
    store: Store, tiny_model: Path, tiny_adapters: dict[str, Path], tiny_backend: EmbeddedBackend
) -> Iterator[World]:
    business, key = store.business_key()
    suffix = uuid.uuid4().hex[:6]
    ids = _register(store, tiny_model, tiny_adapters, suffix)
    with session_scope(store.factory) as session:
        experiment = create_experiment(
            session,
            name="ab",
            business_id=business,
            arms=[
                ArmSpec("control", ids["control"], 1.0),
                ArmSpec("treatment", ids["treatment"], 1.0),
            ],
        )
        experiment_id = experiment.id
    settings = store.settings.model_copy(update={"temperature": 0.0, "max_new_tokens": 12})
    with TestClient(create_app(settings, backend=tiny_backend)) as client:
        yield World(client, store, business, key, store.operator_key(), ids, experiment_id)


def _suggest(world: World, cid: str, **body: object) -> dict:  # type: ignore[type-arg]
    response = world.client.post(
        f"/v1/conversations/{cid}/suggestions", json=body, headers=auth(world.key)
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def test_suggestion_comes_from_the_arms_adapter_and_is_logged(
    world: World, tiny_backend: EmbeddedBackend, tiny_adapters: dict[str, Path]
) -> None:
    seen: dict[str, str] = {}
    for _ in range(12):
        cid = new_conversation(world.client, world.key)
        say(world.client, world.key, cid, "customer", "Hi, do you renovate kitchens?")
        first = _suggest(world, cid)
        assert _suggest(world, cid)["arm"] == first["arm"], "a conversation keeps its arm"
        seen[first["arm"]] = cid
        adapter = {"control": "zero", "treatment": "noisy"}[first["arm"]]
        prompt = build_prompt(
            [Turn("customer", "Hi, do you renovate kitchens?")],
            system=system_prompt(
                business_name=world.business, business_prompt=None, persona_instruction=None
            ),
            count_tokens=tiny_backend.count_tokens,
            max_prompt_tokens=500,
        )
        direct = tiny_backend.generate(
            GenerationRequest(
                prompt.messages,
                AdapterRef(first["policy"], str(tiny_adapters[adapter])),
                SamplingParams(max_new_tokens=12, temperature=0.0),
            ),
            timeout=60,
        )
        assert first["policy"] == world.policies[first["arm"]]
        assert first["text"] == (direct.completions[0].text.strip() or None)
        stored = world.client.get(f"/v1/conversations/{cid}", headers=auth(world.key)).json()
        logged = stored["suggestions"][0]
        assert logged["policy_version"] == first["policy"] and logged["arm"] == first["arm"]
        assert logged["state_seq"] == 1 and logged["logprob"] is not None
        assert logged["sampling_params"]["temperature"] == 0.0
        assert logged["sampling_params"]["backend"] == "embedded"
        assert logged["latency_ms"] > 0
    assert set(seen) == {"control", "treatment"}, "both arms serve with equal weights"


def test_weight_changes_never_move_assigned_conversations(world: World) -> None:
    before = {}
    for _ in range(10):
        cid = new_conversation(world.client, world.key)
        say(world.client, world.key, cid, "customer", "hello")
        before[cid] = _suggest(world, cid, max_new_tokens=2)["arm"]
    moved = world.client.post(
        f"/v1/experiments/{world.experiment_id}/weights",
        json={"weights": {"control": 0.0}},
        headers=auth(world.operator),
    )
    assert moved.status_code == 200, moved.text
    for cid, arm in before.items():
        say(world.client, world.key, cid, "business", "ok")
        say(world.client, world.key, cid, "customer", "and?")
        assert _suggest(world, cid, max_new_tokens=2)["arm"] == arm
    for _ in range(5):
        cid = new_conversation(world.client, world.key)
        say(world.client, world.key, cid, "customer", "hello")
        assert _suggest(world, cid, max_new_tokens=2)["arm"] == "treatment"


def test_candidates_idempotency_and_exploration(world: World) -> None:
    cid = new_conversation(world.client, world.key)
    say(world.client, world.key, cid, "customer", "What does it cost?")
    first = _suggest(world, cid, n=3, temperature=1.0, client_request_id="req-1")
    again = world.client.post(
        f"/v1/conversations/{cid}/suggestions",
        json={"n": 3, "temperature": 1.0, "client_request_id": "req-1"},
        headers=auth(world.key),
    )
    assert again.json()["candidates"] == first["candidates"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(first["candidates"]) == 3
    stored = world.client.get(f"/v1/conversations/{cid}", headers=auth(world.key)).json()
    assert len(stored["suggestions"]) == 3

    stop = world.client.post(
        f"/v1/experiments/{world.experiment_id}/stop", headers=auth(world.operator)
    )
    assert stop.status_code == 200
    explore = world.client.post(
        "/v1/experiments",
        headers=auth(world.operator),
        json={
            "name": "explore",
            "business_id": world.business,
            "arms": [{"name": "only", "policy_id": world.policies["control"], "weight": 1}],
            "exploration": {
                "epsilon": 1.0,
                "personas": [
                    {"name": "emoji", "instruction": "Use one emoji."},
                    {"name": "short", "instruction": "Be short."},
                ],
            },
        },
    )
    assert explore.status_code == 201, explore.text
    fresh = new_conversation(world.client, world.key)
    say(world.client, world.key, fresh, "customer", "hi")
    explored = _suggest(world, fresh, max_new_tokens=2)
    assert explored["arm"] == "only" and explored["persona"]["name"] in {"emoji", "short"}
    logged = world.client.get(f"/v1/conversations/{fresh}", headers=auth(world.key)).json()
    assert logged["suggestions"][0]["propensity"] == pytest.approx(0.5)
    # The conversation assigned under the stopped experiment keeps its arm.
    say(world.client, world.key, cid, "business", "It depends.")
    say(world.client, world.key, cid, "customer", "On what?")
    assert _suggest(world, cid, max_new_tokens=2)["arm"] in {"control", "treatment"}


def test_oversized_context_is_truncated_and_said_so(world: World) -> None:
    cid = new_conversation(world.client, world.key)
    for i in range(31):
        say(
            world.client,
            world.key,
            cid,
            "customer" if i % 2 == 0 else "business",
            f"This is a fairly long message number {i} about kitchens, prices and visits.",
        )
    result = _suggest(world, cid, max_new_tokens=4)
    assert result["truncated"] is True and result["dropped_turns"] > 0


def test_refusals_name_the_problem(world: World) -> None:
    h = auth(world.key)
    cid = new_conversation(world.client, world.key)
    say(world.client, world.key, cid, "customer", "hi")
    say(world.client, world.key, cid, "business", "hello!")
    business_last = world.client.post(f"/v1/conversations/{cid}/suggestions", json={}, headers=h)
    assert (
        business_last.status_code == 409 and "customer" in business_last.json()["error"]["message"]
    )
    too_many = world.client.post(f"/v1/conversations/{cid}/suggestions", json={"n": 99}, headers=h)
    assert too_many.status_code == 422 and "99" in too_many.json()["error"]["message"]
    unknown = world.client.post("/v1/conversations/nope/suggestions", json={}, headers=h)
    assert unknown.status_code == 404
    world.client.post(f"/v1/conversations/{cid}/close", json={"reason": "timeout"}, headers=h)
    closed = world.client.post(f"/v1/conversations/{cid}/suggestions", json={}, headers=h)
    assert closed.status_code == 409 and "closed" in closed.json()["error"]["message"]

    other, other_key = world.store.business_key()
    lonely = new_conversation(world.client, other_key)
    say(world.client, other_key, lonely, "customer", "hi")
    none_running = world.client.post(
        f"/v1/conversations/{lonely}/suggestions", json={}, headers=auth(other_key)
    )
    if none_running.status_code != 201:  # a global experiment may exist from another test
        assert none_running.status_code == 409 and other in none_running.json()["error"]["message"]


def test_one_running_experiment_per_scope(world: World) -> None:
    again = world.client.post(
        "/v1/experiments",
        headers=auth(world.operator),
        json={
            "name": "dup",
            "business_id": world.business,
            "arms": [{"name": "a", "policy_id": world.policies["control"], "weight": 1}],
        },
    )
    assert again.status_code == 409 and "already running" in again.json()["error"]["message"]
    bad = world.client.post(
        "/v1/experiments",
        headers=auth(world.operator),
        json={
            "name": "x",
            "business_id": world.business,
            "arms": [{"name": "a", "policy_id": "no-such-policy", "weight": 1}],
        },
    )
    assert bad.status_code in (404, 409)
    listed = world.client.get("/v1/policies", headers=auth(world.operator)).json()
    statuses = {p["id"]: p["status"] for p in listed["data"]}
    assert statuses[world.policies["control"]] == "serving"


def test_backend_failures_error_or_abstain_per_setting(
    store: Store, tiny_model: Path, tiny_adapters: dict[str, Path], tiny_backend: EmbeddedBackend
) -> None:
    business, key = store.business_key()
    ids = _register(store, tiny_model, tiny_adapters, uuid.uuid4().hex[:6])
    with session_scope(store.factory) as session:
        create_experiment(
            session, name="t", business_id=business, arms=[ArmSpec("control", ids["control"], 1.0)]
        )
    down = VllmBackend(f"http://127.0.0.1:{free_port()}")
    cases = [
        (store.settings, down, 503, "unreachable"),
        (
            store.settings.model_copy(update={"generation_timeout_s": 1e-6}),
            tiny_backend,
            504,
            "timed out",
        ),
    ]
    for settings, backend, status, words in cases:
        with TestClient(create_app(settings, backend=backend)) as client:
            cid = new_conversation(client, key)
            say(client, key, cid, "customer", "hello?")
            failed = client.post(f"/v1/conversations/{cid}/suggestions", json={}, headers=auth(key))
            assert failed.status_code == status and words in failed.json()["error"]["message"]
            # The conversation's events are intact and it can go on.
            say(client, key, cid, "business", "Sorry, one moment.")
    abstaining = store.settings.model_copy(update={"on_backend_error": "abstain"})
    with TestClient(create_app(abstaining, backend=down)) as client:
        cid = new_conversation(client, key)
        say(client, key, cid, "customer", "hello?")
        fallback = client.post(f"/v1/conversations/{cid}/suggestions", json={}, headers=auth(key))
        assert fallback.status_code == 201, fallback.text
        assert fallback.json()["text"] is None
        assert fallback.json()["fallback"] == "abstain_on_backend_error"
        logged = client.get(f"/v1/conversations/{cid}", headers=auth(key)).json()
        assert "unreachable" in logged["suggestions"][0]["sampling_params"]["error"]
    down.close()


def test_metrics_count_suggestions_and_replies_per_arm(world: World) -> None:
    cid = new_conversation(world.client, world.key)
    say(world.client, world.key, cid, "customer", "hi")
    suggestion = _suggest(world, cid, max_new_tokens=3)
    say(
        world.client,
        world.key,
        cid,
        "business",
        suggestion["text"] or "own words",
        suggestion_id=suggestion["suggestion_id"],
    )
    text = world.client.get("/metrics").text
    arm = suggestion["arm"]
    assert f'outcomeloop_suggestions_total{{arm="{arm}",backend="embedded",result=' in text
    assert f'outcomeloop_suggestion_replies_total{{arm="{arm}",relation=' in text
