"""The conversation log over HTTP, on SQLite and on Postgres."""

from __future__ import annotations

from fastapi.testclient import TestClient

from services.db import session_scope
from tests.conftest import Store, auth
from tests.factories import logged_suggestion, new_conversation, say


def test_scripted_exchange_is_logged_in_order(client: TestClient, store: Store) -> None:
    business, key = store.business_key()
    cid = new_conversation(client, key, metadata={"channel": "web"})
    say(client, key, cid, "customer", "Hi, do you renovate kitchens?")
    suggestion = logged_suggestion(
        store,
        business,
        cid,
        "Yes! What size is your kitchen?",
        policy_version="pi0",
        arm="control",
        logprob=-12.5,
    )
    reply = say(
        client, key, cid, "business", "Yes! What size is your kitchen?", suggestion_id=suggestion
    )
    assert reply["suggestion_relation"] == "accepted"
    say(client, key, cid, "customer", "About 12 square meters. Price?")
    abstained = logged_suggestion(store, business, cid, None, policy_version="pi0")
    own = say(
        client, key, cid, "business", "Around 9k; shall we book a visit?", suggestion_id=abstained
    )
    assert own["suggestion_relation"] == "abstained" and own["edit_similarity"] is None
    outcome = client.post(
        f"/v1/conversations/{cid}/outcome", json={"label": "booking"}, headers=auth(key)
    )
    assert outcome.status_code == 201 and outcome.json()["seq"] == 4
    closed = client.post(
        f"/v1/conversations/{cid}/close", json={"reason": "outcome"}, headers=auth(key)
    )
    assert closed.status_code == 200 and closed.json()["status"] == "closed"

    body = client.get(f"/v1/conversations/{cid}", headers=auth(key)).json()
    assert [m["seq"] for m in body["messages"]] == [1, 2, 3, 4]
    assert [m["role"] for m in body["messages"]] == ["customer", "business"] * 2
    assert body["end_reason"] == "outcome" and body["message_count"] == 4
    assert [s["text"] for s in body["suggestions"]] == ["Yes! What size is your kitchen?", None]
    assert [s["state_seq"] for s in body["suggestions"]] == [1, 3]
    assert body["suggestions"][0]["logprob"] == -12.5
    assert body["outcomes"][0]["label"] == "booking"


def test_conversation_may_open_with_the_business(client: TestClient, store: Store) -> None:
    _, key = store.business_key()
    cid = new_conversation(client, key)
    assert say(client, key, cid, "business", "Hello! Spring offer: 10% off.")["seq"] == 1


def test_edited_and_rejected_replies_are_classified(client: TestClient, store: Store) -> None:
    business, key = store.business_key()
    cid = new_conversation(client, key)
    say(client, key, cid, "customer", "Can you come Tuesday?")
    first = logged_suggestion(store, business, cid, "Yes, we can come on Tuesday at 10am.")
    edited = say(
        client, key, cid, "business", "Yes, we can come on Tuesday at 11am.", suggestion_id=first
    )
    assert edited["suggestion_relation"] == "edited" and 0.5 <= edited["edit_similarity"] < 1
    say(client, key, cid, "customer", "And the price?")
    second = logged_suggestion(store, business, cid, "It depends on the size of the room.")
    rejected = say(
        client, key, cid, "business", "Send me photos first please.", suggestion_id=second
    )
    assert rejected["suggestion_relation"] == "rejected" and rejected["edit_similarity"] < 0.5


def test_retried_writes_return_the_first_result(client: TestClient, store: Store) -> None:
    _, key = store.business_key()
    h = auth(key)
    first = client.post("/v1/conversations", json={"client_conversation_id": "c-1"}, headers=h)
    again = client.post("/v1/conversations", json={"client_conversation_id": "c-1"}, headers=h)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    cid = first.json()["id"]

    body = {"role": "customer", "text": "hello", "client_message_id": "m-1"}
    m1 = client.post(f"/v1/conversations/{cid}/messages", json=body, headers=h)
    m2 = client.post(f"/v1/conversations/{cid}/messages", json=body, headers=h)
    assert m1.json() == m2.json() and m2.headers["Idempotent-Replayed"] == "true"
    clash = client.post(
        f"/v1/conversations/{cid}/messages", json={**body, "text": "something else"}, headers=h
    )
    assert clash.status_code == 409 and "m-1" in clash.json()["error"]["message"]

    o1 = client.post(f"/v1/conversations/{cid}/outcome", json={"client_event_id": "o"}, headers=h)
    o2 = client.post(f"/v1/conversations/{cid}/outcome", json={"client_event_id": "o"}, headers=h)
    assert o1.json() == o2.json()
    c1 = client.post(f"/v1/conversations/{cid}/close", json={"reason": "outcome"}, headers=h)
    c2 = client.post(f"/v1/conversations/{cid}/close", json={"reason": "outcome"}, headers=h)
    assert c1.json() == c2.json()
    # A retry of an accepted message still answers after the conversation closed.
    late = client.post(f"/v1/conversations/{cid}/messages", json=body, headers=h)
    assert late.status_code == 201 and late.json() == m1.json()

    stored = client.get(f"/v1/conversations/{cid}", headers=h).json()
    assert len(stored["messages"]) == 1 and len(stored["outcomes"]) == 1


def test_tenants_see_only_their_own_conversations(client: TestClient, store: Store) -> None:
    _, key_a = store.business_key()
    _, key_b = store.business_key()
    cid = new_conversation(client, key_a)
    for method, path, body in [
        ("GET", f"/v1/conversations/{cid}", None),
        ("POST", f"/v1/conversations/{cid}/messages", {"role": "customer", "text": "x"}),
        ("POST", f"/v1/conversations/{cid}/outcome", {}),
        ("POST", f"/v1/conversations/{cid}/close", {"reason": "timeout"}),
    ]:
        response = client.request(method, path, json=body, headers=auth(key_b))
        assert response.status_code == 404, (path, response.text)
        assert cid in response.json()["error"]["message"]
    assert client.get(f"/v1/conversations/{cid}", headers=auth(key_a)).json()["status"] == "open"


def test_auth_is_required_and_roles_are_enforced(client: TestClient, store: Store) -> None:
    _, business_key = store.business_key()
    operator_key = store.operator_key()
    assert client.post("/v1/conversations", json={}).status_code == 401
    bad = client.post("/v1/conversations", json={}, headers=auth("olk_nope"))
    assert bad.status_code == 401 and "unknown" in bad.json()["error"]["message"]
    basic = client.post("/v1/conversations", json={}, headers={"Authorization": "Basic abc"})
    assert basic.status_code == 401 and "Bearer" in basic.json()["error"]["message"]
    as_operator = client.post("/v1/conversations", json={}, headers=auth(operator_key))
    assert as_operator.status_code == 403 and "business" in as_operator.json()["error"]["message"]
    assert client.get("/v1/businesses", headers=auth(business_key)).status_code == 403
    listed = client.get("/v1/businesses", headers=auth(operator_key))
    assert listed.status_code == 200 and listed.json()["object"] == "list"
    assert listed.json()["data"]


def test_bad_input_gets_a_4xx_naming_the_problem(client: TestClient, store: Store) -> None:
    business, key = store.business_key()
    h = auth(key)
    cid = new_conversation(client, key)
    other = new_conversation(client, key)
    say(client, key, cid, "customer", "hello")

    unknown = client.post(
        "/v1/conversations/nope/messages", json={"role": "customer", "text": "x"}, headers=h
    )
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]

    empty = client.post(
        f"/v1/conversations/{cid}/messages", json={"role": "customer", "text": "   "}, headers=h
    )
    assert empty.status_code == 422 and "empty" in empty.json()["error"]["message"]

    huge = client.post(
        f"/v1/conversations/{cid}/messages",
        json={"role": "customer", "text": "x" * 8001},
        headers=h,
    )
    assert huge.status_code == 422 and "8000" in huge.json()["error"]["message"]

    # PostgreSQL text cannot hold NUL: refused with a 422 on every store, never a 500.
    nul = client.post(
        f"/v1/conversations/{cid}/messages",
        json={"role": "customer", "text": "a\u0000b"},
        headers=h,
    )
    assert nul.status_code == 422 and "NUL" in nul.json()["error"]["message"]

    malformed = client.post(
        f"/v1/conversations/{cid}/messages",
        content=b'{"role": "customer", "text": ',
        headers={**h, "Content-Type": "application/json"},
    )
    assert malformed.status_code == 422 and "JSON" in malformed.json()["error"]["message"]

    bad_role = client.post(
        f"/v1/conversations/{cid}/messages", json={"role": "bot", "text": "x"}, headers=h
    )
    assert bad_role.status_code == 422 and "role" in bad_role.json()["error"]["message"]

    foreign = logged_suggestion(store, business, other, "from elsewhere")
    wrong = client.post(
        f"/v1/conversations/{cid}/messages",
        json={"role": "business", "text": "x", "suggestion_id": foreign},
        headers=h,
    )
    assert wrong.status_code == 422 and foreign in wrong.json()["error"]["message"]

    own = logged_suggestion(store, business, cid, "Hi there!")
    on_customer = client.post(
        f"/v1/conversations/{cid}/messages",
        json={"role": "customer", "text": "x", "suggestion_id": own},
        headers=h,
    )
    assert on_customer.status_code == 422 and "business" in on_customer.json()["error"]["message"]
    say(client, key, cid, "business", "Hi there!", suggestion_id=own)
    reused = client.post(
        f"/v1/conversations/{cid}/messages",
        json={"role": "business", "text": "again", "suggestion_id": own},
        headers=h,
    )
    assert reused.status_code == 409 and "already answered" in reused.json()["error"]["message"]

    no_outcome = client.post(
        f"/v1/conversations/{other}/close", json={"reason": "outcome"}, headers=h
    )
    assert (
        no_outcome.status_code == 409
        and "no recorded outcome" in no_outcome.json()["error"]["message"]
    )
    bad_reason = client.post(f"/v1/conversations/{cid}/close", json={"reason": "bored"}, headers=h)
    assert bad_reason.status_code == 422 and "reason" in bad_reason.json()["error"]["message"]

    client.post(f"/v1/conversations/{cid}/close", json={"reason": "customer_left"}, headers=h)
    closed = client.post(
        f"/v1/conversations/{cid}/messages", json={"role": "customer", "text": "wait"}, headers=h
    )
    assert closed.status_code == 409 and "closed" in closed.json()["error"]["message"]
    reclose = client.post(f"/v1/conversations/{cid}/close", json={"reason": "timeout"}, headers=h)
    assert reclose.status_code == 409 and "customer_left" in reclose.json()["error"]["message"]

    # None of the refused requests left a trace.
    stored = client.get(f"/v1/conversations/{cid}", headers=h).json()
    assert [m["text"] for m in stored["messages"]] == ["hello", "Hi there!"]
    assert stored["end_reason"] == "customer_left"


def test_outcome_needs_a_message_and_may_follow_close(client: TestClient, store: Store) -> None:
    _, key = store.business_key()
    h = auth(key)
    cid = new_conversation(client, key)
    empty = client.post(f"/v1/conversations/{cid}/outcome", json={}, headers=h)
    assert empty.status_code == 409 and "no messages" in empty.json()["error"]["message"]
    first = say(client, key, cid, "customer", "I'll think about it")
    say(client, key, cid, "business", "Sure, take your time")
    client.post(f"/v1/conversations/{cid}/close", json={"reason": "customer_left"}, headers=h)
    late = client.post(
        f"/v1/conversations/{cid}/outcome",
        json={"label": "purchase", "message_id": first["id"]},
        headers=h,
    )
    assert late.status_code == 201 and late.json()["seq"] == 1
    wrong = client.post(f"/v1/conversations/{cid}/outcome", json={"message_id": "zzz"}, headers=h)
    assert wrong.status_code == 422 and "zzz" in wrong.json()["error"]["message"]


def test_health_docs_and_metrics(client: TestClient, store: Store) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["database"] == ("postgresql" if store.kind == "postgres" else "sqlite")
    assert (
        "/v1/conversations/{conversation_id}/messages"
        in client.get("/openapi.json").json()["paths"]
    )
    _, key = store.business_key()
    cid = new_conversation(client, key)
    say(client, key, cid, "customer", "hi")
    text = client.get("/metrics").text
    assert 'outcomeloop_messages_total{role="customer"}' in text
    assert cid not in text  # labels never carry ids


def test_every_error_is_structured_with_a_code_a_message_and_the_param(
    client: TestClient, store: Store
) -> None:
    _, key = store.business_key()
    unknown_route = client.get("/v1/nowhere", headers=auth(key))
    assert unknown_route.status_code == 404
    assert unknown_route.json()["error"]["code"] == "not_found"
    wrong_method = client.delete("/v1/conversations", headers=auth(key))
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    bad = client.post(
        "/v1/conversations/x/messages", json={"role": "robot", "text": "hi"}, headers=auth(key)
    )
    assert bad.status_code == 422
    error = bad.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "role"
    assert "role" in error["message"] and "detail" not in bad.json()
    missing = client.get("/v1/conversations/nope", headers=auth(key))
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {"code": "not_found", "message": missing.json()["error"]["message"], "param": None}
    }
    unauthenticated = client.get("/v1/conversations/nope")
    assert unauthenticated.json()["error"]["code"] == "unauthenticated"


def test_metrics_count_crashes_label_outcomes_by_arm_and_can_need_a_token(store: Store) -> None:
    from services.app import create_app
    from services.experiments.service import ArmSpec, create_experiment
    from services.policies.models import PolicyStatus
    from services.policies.service import register_policy

    settings = store.settings.model_copy(update={"metrics_token": "s3cret"})
    app = create_app(settings)

    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    business, key = store.business_key()
    with session_scope(store.factory) as session:
        register_policy(
            session,
            policy_id=f"m-{business}",
            base_model="b",
            adapter_uri="a",
            status=PolicyStatus.APPROVED,
        )
        experiment = create_experiment(
            session, name="ab", business_id=business, arms=[ArmSpec("solo", f"m-{business}", 1)]
        ).id
        from services.iterations.schemas import parse_iteration_request
        from services.iterations.service import create_iteration

        request = parse_iteration_request({"algorithm": "ppo", "parent_policy_id": f"m-{business}"})
        create_iteration(session, settings=settings, request=request)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/boom").status_code == 500
        cid = new_conversation(client, key)
        say(client, key, cid, "customer", "hi")
        with session_scope(store.factory) as session:
            from services.conversations.models import Conversation
            from services.experiments.service import serve_conversation

            conversation = session.get(Conversation, cid)
            assert conversation is not None
            serve_conversation(session, conversation=conversation)
        h = auth(key)
        client.post(f"/v1/conversations/{cid}/outcome", json={}, headers=h)
        client.post(f"/v1/conversations/{cid}/close", json={"reason": "outcome"}, headers=h)
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        text = client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).text
    assert 'outcomeloop_http_requests_total{method="GET",route="/boom",status="5xx"}' in text
    labels = f'experiment="{experiment}"'
    assert f'outcomeloop_outcomes_total{{arm="solo",{labels}}} 1.0' in text
    assert f'outcomeloop_conversations_ended_total{{arm="solo",{labels},reason="outcome"}}' in text
    queued = [line for line in text.splitlines() if line.startswith("outcomeloop_iterations{")]
    assert any('status="queued"' in line and float(line.split()[-1]) >= 1 for line in queued)
