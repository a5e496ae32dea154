"""A whole policy iteration on a tiny real model: returns -> Q -> PPO -> candidate -> approval
-> A/B experiment, through the operator API, with steps running in-process (embedded default)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.db import session_scope
from services.experiments.service import ArmSpec, create_experiment
from services.generation.embedded import EmbeddedBackend
from services.policies.models import PolicyStatus
from services.policies.service import register_policy
from services.tenants.service import ensure_business
from tests.conftest import Store, auth
from tests.factories import new_conversation, say
from tests.iterations.scenario import write_policy_logs
from workers.learning.evidence import MIN_CLUSTERS
from workers.runner import ThreadRunner

TINY_HYPER: dict[str, Any] = {
    "beta": 0.05,
    "n_epochs": 1,
    "batch_size": 2,
    "minibatch_size": 2,
    "num_updates": 2,
    "max_new_tokens": 8,
    "q": {"kind": "head", "max_length": 64, "head_epochs": 200},
}


def seed_world(
    store: Store, tiny_model: Path, adapter: Path, conversations: int = 40
) -> tuple[str, str]:
    """A business with logged history served by pi0 (the tiny zero adapter)."""
    business = f"it-{uuid.uuid4().hex[:8]}"
    policy = f"pi0-{business}"
    with session_scope(store.factory) as session:
        ensure_business(session, business_id=business)
        register_policy(
            session,
            policy_id=policy,
            base_model=str(tiny_model),
            adapter_uri=str(adapter),
            status=PolicyStatus.APPROVED,
        )
        create_experiment(
            session, name="pi0", business_id=business, arms=[ArmSpec("control", policy, 1.0)]
        )
    write_policy_logs(store, business, policy, conversations)
    return business, policy


@pytest.fixture
def inline_client(
    sqlite_store: Store, tiny_backend: EmbeddedBackend, tmp_path: Path
) -> Iterator[TestClient]:
    # Served at temperature 1 without a nucleus: the improvement samples the policy as served.
    settings = sqlite_store.settings.model_copy(
        update={
            "task_runner": "inline",
            "data_dir": tmp_path,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": 8,
        }
    )
    runner = ThreadRunner(settings, sqlite_store.factory)  # what `outcomeloop serve` hands in
    with TestClient(create_app(settings, backend=tiny_backend, runner=runner)) as client:
        yield client


def wait_for(
    client: TestClient, key: str, iteration_id: str, statuses: set[str], timeout: float = 240
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(
            f"/v1/iterations/{iteration_id}", headers=auth(key)
        ).json()
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, f"stuck: {body['status']} {body['events'][-3:]}"
        time.sleep(0.5)


def test_iteration_end_to_end_with_approval(
    inline_client: TestClient, sqlite_store: Store, tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    business, pi0 = seed_world(sqlite_store, tiny_model, tiny_adapters["zero"])
    operator = sqlite_store.operator_key()
    created = inline_client.post(
        "/v1/iterations",
        headers=auth(operator),
        json={
            "algorithm": "ppo",
            "hyperparameters": TINY_HYPER,
            "data": {
                "business_id": business,
                "max_prompts": 4,
                "eval_fraction": 0.3,
                "check_samples": 2,
                "check_conversations": 10,
            },
        },
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["object"] == "iteration" and body["parent_policy_id"] == pi0
    done = wait_for(
        inline_client, operator, body["id"], {"awaiting_approval", "failed", "succeeded"}
    )
    assert done["status"] == "awaiting_approval", done["error"]
    assert [s["step"] for s in done["steps"]] == [
        "returns",
        "fit_q",
        "evaluate_q",
        "improve",
        "check",
        "register",
    ]
    assert done["metrics"]["data_examples"] == 40
    # The candidate check scored held-out conversations' decisions (one each here) and the
    # operator sees its verdict and estimates where approval waits.
    metrics = done["metrics"]
    held_out = next(s["result"]["eval"] for s in done["steps"] if s["step"] == "returns")
    # Conversation ids are random, so how many the hash split holds out varies from run to run.
    # The check Q splits them in two folds of equal size; from 4 conversations each fold has a
    # head fitted on at least 2 conversations of the other, so every chosen decision is scored.
    if held_out >= 4:
        assert metrics["check_states"] == metrics["estimate_conversations"] == min(10, held_out)
    else:
        assert metrics["check_states"] == metrics["estimate_conversations"] <= held_out
    assert isinstance(metrics["check_flagged"], bool)
    if metrics["check_states"] >= MIN_CLUSTERS:
        assert metrics["check_gain_lo"] <= metrics["check_gain"] <= metrics["check_gain_hi"]
    else:  # too few conversations for an interval: flagged, never passed silently
        assert metrics["check_gain_lo"] is None and metrics["check_flagged"]
    assert 0 < metrics["estimate_ess"] <= 10 and metrics["estimate_dr"] is not None
    events = inline_client.get(f"/v1/iterations/{body['id']}/events", headers=auth(operator)).json()
    assert [e["seq"] for e in events["data"]] == sorted(e["seq"] for e in events["data"])
    first, rest = (
        inline_client.get(
            f"/v1/iterations/{body['id']}/events", params=params, headers=auth(operator)
        ).json()
        for params in ({"limit": 1}, {"after": events["data"][0]["seq"]})
    )
    assert first["has_more"] and first["data"] + rest["data"] == events["data"]
    waiting = [e for e in events["data"] if e["kind"] == "awaiting_approval"]
    assert len(waiting) == 1 and "held-out Q gain pi_i+1 - pi_i" in waiting[0]["message"]
    assert done["metrics"]["q_auc"] >= 0.8, "Q must learn the keyword that wins"
    candidate = done["candidate_policy_id"]
    policy = inline_client.get(f"/v1/policies/{candidate}", headers=auth(operator)).json()
    assert policy["status"] == "candidate" and policy["parent_id"] == pi0
    assert policy["iteration_id"] == body["id"]
    assert policy["config"]["improve"]["algorithm"] == "ppo"
    assert Path(policy["adapter_uri"], "adapter_config.json").is_file()

    approved = inline_client.post(f"/v1/iterations/{body['id']}/approve", headers=auth(operator))
    assert approved.status_code == 200, approved.text
    final = wait_for(inline_client, operator, body["id"], {"succeeded", "failed"})
    assert final["status"] == "succeeded", final["error"]
    experiment = inline_client.get(
        f"/v1/experiments/{final['experiment_id']}", headers=auth(operator)
    ).json()
    assert {a["name"]: a["policy_id"] for a in experiment["arms"]} == {
        "control": pi0,
        "treatment": candidate,
    }
    # The new arm serves suggestions.
    _, key = sqlite_store.business_key(business)
    arms = set()
    for _ in range(10):
        cid = new_conversation(inline_client, key)
        say(inline_client, key, cid, "customer", "Hi, do you renovate kitchens?")
        response = inline_client.post(
            f"/v1/conversations/{cid}/suggestions", json={}, headers=auth(key)
        )
        assert response.status_code == 201, response.text
        arms.add(response.json()["policy"])
    assert arms == {pi0, candidate}


OFFLINE_HYPER: dict[str, Any] = {
    "beta": 0.1,
    "n_epochs": 1,
    "batch_size": 2,
    "learning_rate": 1e-3,
    "q": {"kind": "head", "max_length": 64, "head_epochs": 200},
}


@pytest.mark.parametrize("algorithm", ["dmpo", "dpo"])
def test_offline_iterations_end_to_end(
    algorithm: str,
    inline_client: TestClient,
    sqlite_store: Store,
    tiny_model: Path,
    tiny_adapters: dict[str, Path],
) -> None:
    """DMPO (pairs of logged conversations) and DPO (the business's rewrites of suggestions)
    produce a candidate through the same steps, gate and check as PPO."""
    business, pi0 = seed_world(sqlite_store, tiny_model, tiny_adapters["zero"], conversations=0)
    write_policy_logs(sqlite_store, business, pi0, 40, rewrite=0.5)
    operator = sqlite_store.operator_key()
    created = inline_client.post(
        "/v1/iterations",
        headers=auth(operator),
        json={
            "algorithm": algorithm,
            "hyperparameters": {**OFFLINE_HYPER, "gamma": 0.9},
            "data": {
                "business_id": business,
                "eval_fraction": 0.3,
                "check_samples": 2,
                # the gate is tested elsewhere; with ids random, Q's interval varies here
                "override_gate": True,
            },
        },
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert "temperature" not in body["configs"]["improve"]  # nothing is sampled
    if algorithm == "dmpo":  # the turn weights' discount is the iteration's gamma
        assert body["configs"]["improve"]["gamma"] == body["configs"]["returns"]["gamma"] == 0.9
    done = wait_for(inline_client, operator, body["id"], {"awaiting_approval", "failed"})
    assert done["status"] == "awaiting_approval", done["error"]
    assert [s["step"] for s in done["steps"]] == [
        "returns",
        "fit_q",
        "evaluate_q",
        "improve",
        "check",
        "register",
    ]
    metrics = done["metrics"]
    returns = next(s["result"] for s in done["steps"] if s["step"] == "returns")
    counts = returns["preferences"]
    assert counts["conversations"] == returns["train_conversations"]
    if algorithm == "dmpo":
        # pairs sharing the opening turn come first; with the split by random ids a leftover
        # winner may pair with a loser whose opening is only similar (shares no turn), so
        # the mean is above 0 but not necessarily 1 (CI, stop 20: 5 of 6 pairs shared it)
        assert metrics["improve_pairs"] >= 1
        assert 0 < metrics["improve_pairs_shared_turns"] <= 1
        assert metrics["improve_pairs"] <= 2 * counts["with_outcome"]
    else:
        assert counts["edits_rejected"] >= 1 and counts["edits_edited"] == 0
        assert metrics["improve_pairs"] == counts["edits_rejected"]
    assert "check_flagged" in metrics
    candidate = inline_client.get(
        f"/v1/policies/{done['candidate_policy_id']}", headers=auth(operator)
    ).json()
    assert candidate["config"]["improve"]["algorithm"] == algorithm
    assert Path(candidate["adapter_uri"], "adapter_config.json").is_file()


def test_q_gate_stops_and_an_operator_can_override(
    inline_client: TestClient, sqlite_store: Store, tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    # No conversation reached an outcome: Q cannot be evaluated (AUC needs both classes).
    business, pi0 = seed_world(sqlite_store, tiny_model, tiny_adapters["zero"], conversations=0)
    write_policy_logs(sqlite_store, business, pi0, 20, good_rate=0.0)
    operator = sqlite_store.operator_key()
    created = inline_client.post(
        "/v1/iterations",
        headers=auth(operator),
        json={
            "hyperparameters": TINY_HYPER,
            "data": {"business_id": business, "max_prompts": 2, "rank_floor": 0.5},
        },
    ).json()
    failed = wait_for(inline_client, operator, created["id"], {"failed", "awaiting_approval"})
    assert failed["status"] == "failed" and "below the floor" in failed["error"]
    assert failed["current_step"] == "evaluate_q"
    assert (
        inline_client.post(
            f"/v1/iterations/{created['id']}/approve", headers=auth(operator)
        ).status_code
        == 409
    )
    retried = inline_client.post(
        f"/v1/iterations/{created['id']}/retry",
        json={"override_gate": True},
        headers=auth(operator),
    )
    assert retried.status_code == 200, retried.text
    resumed = wait_for(inline_client, operator, created["id"], {"awaiting_approval", "failed"})
    assert resumed["status"] == "awaiting_approval", resumed["error"]
    attempts = {s["step"]: s["attempts"] for s in resumed["steps"]}
    assert attempts["fit_q"] == 1, "done steps are not redone on retry"
    rejected = inline_client.post(
        f"/v1/iterations/{created['id']}/reject", headers=auth(operator)
    ).json()
    assert rejected["status"] == "cancelled"
    policy = inline_client.get(
        f"/v1/policies/{rejected['candidate_policy_id']}", headers=auth(operator)
    ).json()
    assert policy["status"] == "rejected"


def test_iterations_api_refuses_bad_requests(
    inline_client: TestClient, sqlite_store: Store
) -> None:
    operator = sqlite_store.operator_key()
    _, business_key = sqlite_store.business_key()
    assert (
        inline_client.post("/v1/iterations", json={}, headers=auth(business_key)).status_code == 403
    )
    bad = inline_client.post(
        "/v1/iterations",
        headers=auth(operator),
        json={"algorithm": "ppo", "hyperparameters": {"beta": -1}, "parent_policy_id": "nope"},
    )
    assert bad.status_code == 422 and "beta" in bad.json()["error"]["message"], "validated first"
    missing = inline_client.post(
        "/v1/iterations", headers=auth(operator), json={"parent_policy_id": "nope"}
    )
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    unknown = inline_client.get("/v1/iterations/missing", headers=auth(operator))
    assert unknown.status_code == 404 and "missing" in unknown.json()["error"]["message"]
    wrong_algo = inline_client.post(
        "/v1/iterations", headers=auth(operator), json={"algorithm": "sft"}
    )
    assert wrong_algo.status_code == 422 and "algorithm" in wrong_algo.json()["error"]["message"]
