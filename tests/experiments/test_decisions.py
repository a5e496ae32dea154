"""Promotion, the guardrail's rollback and the audit trail, on SQLite and Postgres."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from fastapi.testclient import TestClient

from services.conversations.models import Conversation, EndReason, Speaker
from services.conversations.service import (
    append_message,
    close_conversation,
    create_conversation,
    record_outcome,
    record_suggestion,
)
from services.db import session_scope
from services.experiments.decisions import check_all_guardrails
from services.experiments.service import ArmSpec, create_experiment, serve_conversation
from services.policies.models import PolicyStatus
from services.policies.service import get_policy, register_policy
from tests.conftest import Store, auth


def _experiment(store: Store, business: str, weights: tuple[float, float] = (1, 1)) -> str:
    suffix = uuid.uuid4().hex[:6]
    with session_scope(store.factory) as session:
        for name in ("pi0", "pi1"):
            register_policy(
                session,
                policy_id=f"{name}-{suffix}",
                base_model="base",
                adapter_uri=name,
                status=PolicyStatus.APPROVED,
            )
        return create_experiment(
            session,
            name="ab",
            business_id=business,
            arms=[
                ArmSpec("control", f"pi0-{suffix}", weights[0]),
                ArmSpec("treatment", f"pi1-{suffix}", weights[1]),
            ],
        ).id


def _traffic(
    store: Store,
    business: str,
    n: int,
    wins: Callable[[str, int], bool],
    close: bool = True,
    accepts: Callable[[str, int], bool] | None = None,
) -> dict[str, int]:
    """n conversations through the service layer, each served by its arm; `wins(arm, i)` says
    whether it reaches the outcome. Returns the conversations per arm."""
    per_arm: dict[str, int] = {}
    with session_scope(store.factory) as session:
        for i in range(n):
            conversation = create_conversation(session, business_id=business).row
            append_message(
                session,
                settings=store.settings,
                business_id=business,
                conversation_id=conversation.id,
                role=Speaker.CUSTOMER,
                text="hello",
            )
            arm = serve_conversation(session, conversation=conversation).arm.name
            per_arm[arm] = per_arm.get(arm, 0) + 1
            if accepts is not None:
                suggestion = record_suggestion(
                    session,
                    settings=store.settings,
                    business_id=business,
                    conversation_id=conversation.id,
                    text="We fit kitchens.",
                    arm=arm,
                ).row
                append_message(
                    session,
                    settings=store.settings,
                    business_id=business,
                    conversation_id=conversation.id,
                    role=Speaker.BUSINESS,
                    text="We fit kitchens." if accepts(arm, i) else "Sorry, we do not.",
                    suggestion_id=suggestion.id,
                )
            if not close:
                continue
            won = wins(arm, i)
            if won:
                record_outcome(session, business_id=business, conversation_id=conversation.id)
            close_conversation(
                session,
                business_id=business,
                conversation_id=conversation.id,
                reason=EndReason.OUTCOME if won else EndReason.CUSTOMER_LEFT,
            )
    return per_arm


def _audit(client: TestClient, operator: str) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    after = None
    while True:
        params = {"limit": 2, **({"after": after} if after is not None else {})}
        page = client.get("/v1/audit", params=params, headers=auth(operator)).json()
        events.extend(page["data"])
        if not page["has_more"]:
            return events
        after = page["data"][-1]["id"]


def test_promotion_serves_the_winner_to_new_conversations_only(
    store: Store, client: TestClient
) -> None:
    business, _ = store.business_key()
    operator = store.operator_key()
    experiment_id = _experiment(store, business)
    _traffic(store, business, 12, lambda arm, i: False, close=False)  # assigned, still open
    with session_scope(store.factory) as session:
        open_arms = {
            c.id: c.arm_id
            for c in session.query(Conversation).filter(Conversation.business_id == business)
        }
    bad = client.post(
        f"/v1/experiments/{experiment_id}/promote", json={"arm": "nope"}, headers=auth(operator)
    )
    assert bad.status_code == 422 and "no arm 'nope'" in bad.text
    response = client.post(
        f"/v1/experiments/{experiment_id}/promote",
        json={"arm": "treatment"},
        headers=auth(operator),
    )
    assert response.status_code == 200, response.text
    serving = response.json()
    assert serving["id"] != experiment_id and serving["scope"] == business
    assert [(a["name"], a["weight"]) for a in serving["arms"]] == [("treatment", 1.0)]
    old = client.get(f"/v1/experiments/{experiment_id}", headers=auth(operator)).json()
    assert old["status"] == "stopped"
    again = client.post(
        f"/v1/experiments/{experiment_id}/promote",
        json={"arm": "treatment"},
        headers=auth(operator),
    )
    assert again.status_code == 409
    # Every new conversation gets the winner; those already assigned keep their arm.
    new = _traffic(store, business, 6, lambda arm, i: False, close=False)
    assert new == {"treatment": 6}
    with session_scope(store.factory) as session:
        for conversation_id, arm_id in open_arms.items():
            conversation = session.get(Conversation, conversation_id)
            assert conversation is not None
            assert serve_conversation(session, conversation=conversation).arm.id == arm_id
        winner = serving["arms"][0]["policy_id"]
        assert get_policy(session, policy_id=winner).status == PolicyStatus.SERVING
    actions = [(e["action"], e["subject_id"]) for e in _audit(client, operator)]
    assert ("experiment.promoted", experiment_id) in actions
    assert ("experiment.created", serving["id"]) in actions
    promoted = next(e for e in _audit(client, operator) if e["action"] == "experiment.promoted")
    assert promoted["actor"] != "cli" and promoted["data"]["arm"] == "treatment"  # type: ignore[index]


def test_a_weight_change_is_no_sample_ratio_mismatch(store: Store, client: TestClient) -> None:
    """Units assigned under 1:0 and then under 1:1 are what those weights lead to expect,
    period by period (from the audit trail), not a mismatch against the latest weights."""
    business, _ = store.business_key()
    operator = store.operator_key()
    experiment_id = _experiment(store, business, weights=(1, 0))  # all units go to control
    assert _traffic(store, business, 30, lambda arm, i: False) == {"control": 30}
    reweighted = client.post(
        f"/v1/experiments/{experiment_id}/weights",
        json={"weights": {"control": 1, "treatment": 1}},
        headers=auth(operator),
    )
    assert reweighted.status_code == 200
    _traffic(store, business, 20, lambda arm, i: False)
    results = client.get(f"/v1/experiments/{experiment_id}/results", headers=auth(operator))
    srm = results.json()["sample_ratio_mismatch"]
    assert srm["flagged"] is False and srm["p_value"] > 0.01, srm
    # Against the latest weights alone (1:1) the same units would look broken.
    arms = {a["name"]: a["units"] for a in results.json()["arms"]}
    from services.experiments.statistics import sample_ratio_mismatch

    naive = sample_ratio_mismatch([arms["control"], arms["treatment"]], [1, 1])
    assert naive.p_value < 0.001


def test_a_sample_ratio_mismatch_blocks_promotion(store: Store, client: TestClient) -> None:
    from sqlalchemy import update

    from services.experiments.models import Arm, Assignment

    business, _ = store.business_key()
    operator = store.operator_key()
    experiment_id = _experiment(store, business)
    _traffic(store, business, 40, lambda arm, i: False)
    with session_scope(store.factory) as session:  # broken assignment: every unit in control
        control = session.query(Arm).filter_by(experiment_id=experiment_id, name="control").one()
        session.execute(
            update(Assignment)
            .where(Assignment.experiment_id == experiment_id)
            .values(arm_id=control.id)
        )
    results = client.get(f"/v1/experiments/{experiment_id}/results", headers=auth(operator))
    assert results.json()["sample_ratio_mismatch"]["flagged"] is True
    blocked = client.post(
        f"/v1/experiments/{experiment_id}/promote",
        json={"arm": "control"},
        headers=auth(operator),
    )
    assert blocked.status_code == 409 and "sample ratio mismatch" in blocked.text


def test_the_guardrail_rolls_a_worse_treatment_back_to_control(
    store: Store, client: TestClient
) -> None:
    business, _ = store.business_key()
    operator = store.operator_key()
    experiment_id = _experiment(store, business)
    # Close to no difference: the guardrail stays quiet.
    _traffic(store, business, 40, lambda arm, i: i % 3 == 0)
    with session_scope(store.factory) as session:
        assert check_all_guardrails(session) == []
    # Then control wins half its conversations and treatment none.
    _traffic(store, business, 200, lambda arm, i: arm == "control" and i % 2 == 0)
    results = client.get(f"/v1/experiments/{experiment_id}/results", headers=auth(operator))
    assert results.json()["comparisons"][0]["sequential_verdict"] == "worse"
    with session_scope(store.factory) as session:
        assert check_all_guardrails(session) == [experiment_id]
    old = client.get(f"/v1/experiments/{experiment_id}", headers=auth(operator)).json()
    assert old["status"] == "stopped"
    assert _traffic(store, business, 4, lambda arm, i: False, close=False) == {"control": 4}
    rolled = [
        e
        for e in _audit(client, operator)
        if e["action"] == "experiment.rolled_back" and e["subject_id"] == experiment_id
    ]
    assert len(rolled) == 1 and rolled[0]["actor"] == "guardrail"
    assert rolled[0]["subject_id"] == experiment_id
    assert rolled[0]["data"]["worse"][0]["arm"] == "treatment"  # type: ignore[index]


def test_audit_lists_who_decided_what_in_order(store: Store, client: TestClient) -> None:
    operator = store.operator_key()
    business, key = store.business_key()
    experiment_id = _experiment(store, business)
    client.post(
        f"/v1/experiments/{experiment_id}/weights",
        json={"weights": {"treatment": 3}},
        headers=auth(operator),
    )
    client.post(f"/v1/experiments/{experiment_id}/stop", headers=auth(operator))
    events = [e for e in _audit(client, operator) if e["subject_id"] == experiment_id]
    assert [e["action"] for e in events] == [
        "experiment.created",
        "experiment.weights_changed",
        "experiment.stopped",
    ]
    assert events[0]["actor"] == "system"  # created through the service, not the API
    assert events[1]["actor"] == events[2]["actor"] != "system"
    assert events[1]["data"] == {  # type: ignore[comparison-overlap]
        "before": {"control": 1.0, "treatment": 1.0},
        "after": {"control": 1.0, "treatment": 3.0},
    }
    ids = [int(e["id"]) for e in _audit(client, operator)]  # type: ignore[call-overload]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert client.get("/v1/audit", headers=auth(key)).status_code == 403
    assert client.get("/v1/audit?limit=0", headers=auth(operator)).status_code == 422


def test_cancelling_an_iteration_over_the_api_is_audited(store: Store, client: TestClient) -> None:
    from services.iterations import service
    from services.iterations.schemas import parse_iteration_request

    suffix = uuid.uuid4().hex[:6]
    with session_scope(store.factory) as session:
        register_policy(
            session,
            policy_id=f"p-{suffix}",
            base_model="/m",
            adapter_uri="/a",
            status=PolicyStatus.APPROVED,
        )
        request = parse_iteration_request({"algorithm": "ppo", "parent_policy_id": f"p-{suffix}"})
        iteration_id = service.create_iteration(
            session, settings=store.settings, request=request
        ).id
    operator = store.operator_key()
    response = client.post(f"/v1/iterations/{iteration_id}/cancel", headers=auth(operator))
    assert response.status_code == 200, response.text
    (event,) = [e for e in _audit(client, operator) if e["subject_id"] == iteration_id]
    assert event["action"] == "iteration.cancelled" and event["subject_type"] == "iteration"
    assert event["actor"] not in ("system", "cli")


def test_the_guardrail_rolls_back_when_suggestions_stop_being_accepted(
    store: Store, client: TestClient
) -> None:
    business, _ = store.business_key()
    operator = store.operator_key()
    experiment_id = _experiment(store, business)
    # Same outcome rates; treatment's suggestions are never used as they are.
    _traffic(
        store,
        business,
        80,
        lambda arm, i: i % 4 == 0,
        accepts=lambda arm, i: arm == "control",
    )
    results = client.get(f"/v1/experiments/{experiment_id}/results", headers=auth(operator))
    arms = {a["name"]: a for a in results.json()["arms"]}
    assert arms["control"]["reply_rates"]["accepted"] == 1.0
    assert arms["treatment"]["reply_rates"]["accepted"] == 0.0
    with session_scope(store.factory) as session:
        assert check_all_guardrails(session) == [experiment_id]
    (rolled,) = [
        e
        for e in _audit(client, operator)
        if e["action"] == "experiment.rolled_back" and e["subject_id"] == experiment_id
    ]
    (worse,) = rolled["data"]["worse"]  # type: ignore[index]
    assert worse["metric"] == "acceptance_rate" and worse["arm"] == "treatment"
