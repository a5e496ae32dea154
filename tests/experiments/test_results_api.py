"""GET /v1/experiments/{id}/results and `outcomeloop experiments results` on a store filled
through the public API (SQLite and Postgres)."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient

from services.conversations.models import Conversation
from services.db import session_scope
from services.experiments.service import ArmSpec, create_experiment, serve_conversation
from services.experiments.statistics import (
    difference_interval,
    sample_ratio_mismatch,
    sequential_interval,
    wilson_interval,
)
from services.policies.models import PolicyStatus
from services.policies.service import register_policy
from tests.conftest import Store, auth
from tests.factories import logged_suggestion, new_conversation, say


def _experiment(store: Store, business: str) -> tuple[str, dict[str, str]]:
    suffix = uuid.uuid4().hex[:6]
    arms = {"control": f"pi0-{suffix}", "treatment": f"pi1-{suffix}"}
    with session_scope(store.factory) as session:
        for name, policy_id in arms.items():
            register_policy(
                session,
                policy_id=policy_id,
                base_model="base",
                adapter_uri=f"adapters/{name}",
                status=PolicyStatus.APPROVED,
            )
        experiment = create_experiment(
            session,
            name="ab",
            business_id=business,
            arms=[ArmSpec(name, policy, 1.0) for name, policy in arms.items()],
        )
        return experiment.id, arms


def test_results_count_each_arm_and_compare_it_with_control(
    store: Store, client: TestClient
) -> None:
    business, key = store.business_key()
    operator = store.operator_key()
    experiment_id, policies = _experiment(store, business)
    counts = {
        arm: {"ended": 0, "outcomes": 0, "units": 0, "accepted": 0, "replies": 0}
        for arm in policies
    }
    latencies: dict[str, list[float]] = {arm: [] for arm in policies}
    for i in range(24):
        conversation_id = new_conversation(client, key)
        say(client, key, conversation_id, "customer", "Do you fit kitchens?")
        with session_scope(store.factory) as session:
            conversation = session.get(Conversation, conversation_id)
            assert conversation is not None
            arm = serve_conversation(session, conversation=conversation).arm.name
        counts[arm]["units"] += 1
        latency = 10.0 + i
        latencies[arm].append(latency)
        suggestion = logged_suggestion(
            store, business, conversation_id, "We do.", latency_ms=latency, arm=arm
        )
        accepted = i % 3 != 0
        say(
            client,
            key,
            conversation_id,
            "business",
            "We do." if accepted else "Yes, we fit kitchens and bathrooms.",
            suggestion_id=suggestion,
        )
        counts[arm]["replies"] += 1
        counts[arm]["accepted"] += accepted
        if i % 4 == 3:
            continue  # still open: counts as a unit, not in the outcome rate
        won = (arm == "treatment" and i % 2 == 0) or i % 5 == 0
        if won:
            response = client.post(
                f"/v1/conversations/{conversation_id}/outcome", json={}, headers=auth(key)
            )
            assert response.status_code == 201, response.text
        response = client.post(
            f"/v1/conversations/{conversation_id}/close",
            json={"reason": "outcome" if won else "customer_left"},
            headers=auth(key),
        )
        assert response.status_code == 200, response.text
        counts[arm]["ended"] += 1
        counts[arm]["outcomes"] += won
    assert all(c["units"] > 3 for c in counts.values()), counts

    response = client.get(f"/v1/experiments/{experiment_id}/results", headers=auth(operator))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["control"] == "control" and body["status"] == "running"
    arms = {arm["name"]: arm for arm in body["arms"]}
    for name, expected in counts.items():
        arm = arms[name]
        assert arm["policy_id"] == policies[name]
        assert (arm["units"], arm["conversations"]) == (expected["units"], expected["units"])
        assert (arm["ended"], arm["outcomes"]) == (expected["ended"], expected["outcomes"])
        assert arm["outcome_rate"] == expected["outcomes"] / expected["ended"]
        assert arm["outcome_rate_interval"] == list(
            wilson_interval(expected["outcomes"], expected["ended"])
        )
        assert arm["replies"] == expected["replies"]
        assert arm["reply_rates"]["accepted"] == expected["accepted"] / expected["replies"]
        assert arm["suggestions"] == len(latencies[name])
        assert abs(arm["mean_latency_ms"] - sum(latencies[name]) / len(latencies[name])) < 1e-6
    (comparison,) = body["comparisons"]
    t, c = counts["treatment"], counts["control"]
    args = (t["outcomes"], t["ended"], c["outcomes"], c["ended"])
    assert comparison["treatment"] == "treatment" and comparison["control"] == "control"
    assert comparison["difference"] == t["outcomes"] / t["ended"] - c["outcomes"] / c["ended"]
    assert comparison["difference_interval"] == list(difference_interval(*args))
    assert comparison["sequential_interval"] == list(sequential_interval(*args))
    assert comparison["test"]["method"] == "Boschloo exact test"  # small arms
    assert 0 <= comparison["test"]["p_value"] <= 1
    assert 0 <= comparison["probability_treatment_better"] <= 1
    srm = body["sample_ratio_mismatch"]
    expected_srm = sample_ratio_mismatch([c["units"], t["units"]], [1.0, 1.0])
    assert srm["p_value"] == expected_srm.p_value and srm["flagged"] is False
    assert set(body["methods"]) >= {"test", "sequential_interval", "srm", "difference_interval"}


def test_results_need_an_operator_and_a_real_experiment(store: Store, client: TestClient) -> None:
    business, key = store.business_key()
    experiment_id, _ = _experiment(store, business)
    url = f"/v1/experiments/{experiment_id}/results"
    assert client.get(url, headers=auth(key)).status_code == 403
    operator = store.operator_key()
    missing = client.get("/v1/experiments/nope/results", headers=auth(operator))
    assert missing.status_code == 404
    empty = client.get(url, headers=auth(operator)).json()
    assert [a["ended"] for a in empty["arms"]] == [0, 0]
    assert empty["comparisons"][0]["minimum_detectable_effect"] is None


def test_operator_lists_are_newest_first_pages(store: Store, client: TestClient) -> None:
    business, _ = store.business_key()
    operator = store.operator_key()
    created = []
    for _ in range(3):
        experiment_id, _ = _experiment(store, business)
        client.post(f"/v1/experiments/{experiment_id}/stop", headers=auth(operator))
        created.append(experiment_id)
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, object] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/experiments", params=params, headers=auth(operator)).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen.extend(e["id"] for e in page["data"])
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i in created] == created[::-1]  # newest first, each once
    policies = client.get("/v1/policies", params={"limit": 1}, headers=auth(operator)).json()
    assert len(policies["data"]) == 1 and policies["has_more"] is True
    for path in ("experiments", "policies", "iterations", "businesses"):
        unknown = client.get(f"/v1/{path}", params={"after": "nope"}, headers=auth(operator))
        assert unknown.status_code == 422 and "'nope'" in unknown.text, path
        assert client.get(f"/v1/{path}?limit=0", headers=auth(operator)).status_code == 422
