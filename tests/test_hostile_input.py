"""Input a store cannot keep exactly is a 422 naming where it was, on both stores (it was a 500
on Postgres); oversized bodies are a 413; racing retries of one create all get the first
conversation; a reused client_conversation_id with other metadata is a 409; a client never sees
a server path."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.boundary import UnsafeInput, strict_loads
from services.conversations import service as conversations
from services.conversations.jsonl import parse_lines
from services.db import session_scope
from services.errors import Conflict
from services.tenants import repository as tenants_repository
from services.tenants.service import ensure_business
from tests.conftest import Store, auth


@pytest.fixture
def client(store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(store.settings)) as c:
        yield c


def post_raw(client: TestClient, path: str, key: str, raw: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    response = client.post(
        path,
        content=raw.encode("utf-8", "surrogatepass"),
        headers={**auth(key), "Content-Type": "application/json"},
    )
    return response.status_code, response.json()


@pytest.mark.parametrize(
    ("raw", "param", "words"),
    [
        ('{"metadata": {"note": "a\\u0000b"}}', "metadata.note", "NUL"),
        ('{"metadata": {"a\\u0000": 1}}', "metadata.a\x00", "NUL"),
        ('{"metadata": {"x": "x\\ud800y"}}', "metadata.x", "surrogate"),
        ('{"metadata": {"x": NaN}}', "metadata.x", "NaN"),
        ('{"metadata": {"x": [1, Infinity]}}', "metadata.x.1", "Infinity"),
        ('{"metadata": {"x": -Infinity}}', "metadata.x", "Infinity"),
        ('{"metadata": {"x": 1e400}}', "metadata.x", "1e308"),
        ('{"client_conversation_id": "a\\u0000b"}', "client_conversation_id", "NUL"),
    ],
)
def test_unstorable_json_is_422_naming_where(
    client: TestClient, store: Store, raw: str, param: str | None, words: str
) -> None:
    _, key = store.business_key()
    status, body = post_raw(client, "/v1/conversations", key, raw)
    assert status == 422, body
    assert body["error"]["code"] == "invalid_request"
    assert words in body["error"]["message"]
    assert body["error"]["param"] == param


def test_unstorable_message_text_and_ids_are_422(client: TestClient, store: Store) -> None:
    _, key = store.business_key()
    cid = client.post("/v1/conversations", json={}, headers=auth(key)).json()["id"]
    for text in ("a\\u0000b", "x\\ud800y", "\\udfff"):
        status, body = post_raw(
            client,
            f"/v1/conversations/{cid}/messages",
            key,
            f'{{"role": "customer", "text": "{text}"}}',
        )
        assert status == 422 and body["error"]["param"] == "text", body
    got = client.get("/v1/conversations/a%00b", headers=auth(key))
    assert got.status_code == 422 and got.json()["error"]["param"] == "path", got.text
    listed = client.get("/v1/conversations/x/messages?after=a%00", headers=auth(key))
    assert listed.status_code == 422 and "query.after" in listed.json()["error"]["message"]
    # what is storable still goes through, emoji (a surrogate pair in JSON) included
    status, body = post_raw(
        client,
        f"/v1/conversations/{cid}/messages",
        key,
        '{"role": "customer", "text": "hi \\ud83d\\ude00"}',
    )
    assert status == 201 and body["text"] == "hi \U0001f600", body
    stored = client.get(f"/v1/conversations/{cid}", headers=auth(key)).json()
    assert [m["text"] for m in stored["messages"]] == ["hi \U0001f600"]


def test_oversized_bodies_are_413_and_metadata_has_a_limit(store: Store) -> None:
    settings = store.settings.model_copy(update={"max_body_bytes": 4096, "max_metadata_bytes": 64})
    with TestClient(create_app(settings)) as client:
        _, key = store.business_key()
        big = {"metadata": {"x": "a" * 5000}}
        response = client.post("/v1/conversations", json=big, headers=auth(key))
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
        response = client.post(
            "/v1/conversations", json={"metadata": {"x": "a" * 100}}, headers=auth(key)
        )
        assert response.status_code == 422 and response.json()["error"]["param"] == "metadata"
        assert "OUTCOMELOOP_MAX_METADATA_BYTES" in response.json()["error"]["message"]
        fine = client.post(
            "/v1/conversations", json={"metadata": {"x": "a" * 10}}, headers=auth(key)
        )
        assert fine.status_code == 201, fine.text


def test_a_reused_client_id_with_other_metadata_is_409(client: TestClient, store: Store) -> None:
    _, key = store.business_key()
    first = client.post(
        "/v1/conversations",
        json={"client_conversation_id": "c1", "metadata": {"a": 1}},
        headers=auth(key),
    )
    again = client.post(
        "/v1/conversations",
        json={"client_conversation_id": "c1", "metadata": {"a": 1}},
        headers=auth(key),
    )
    other = client.post(
        "/v1/conversations",
        json={"client_conversation_id": "c1", "metadata": {"a": 2}},
        headers=auth(key),
    )
    assert first.status_code == again.status_code == 201
    assert (
        again.headers["Idempotent-Replayed"] == "true" and again.json()["id"] == first.json()["id"]
    )
    assert other.status_code == 409 and other.json()["error"]["param"] == "metadata", other.text


def test_racing_creates_with_one_client_id_all_get_the_first(pg_store: Store) -> None:
    """20 threads, each its own transaction on Postgres, released together (was 2 x 500)."""
    business = f"race-{uuid.uuid4().hex[:8]}"
    with session_scope(pg_store.factory) as session:
        ensure_business(session, business_id=business)
    barrier = threading.Barrier(20)
    results: list[tuple[str, bool] | BaseException] = []

    def create() -> None:
        try:
            barrier.wait()
            with session_scope(pg_store.factory) as session:
                written = conversations.create_conversation(
                    session, business_id=business, client_conversation_id="same", meta={"k": 1}
                )
                results.append((written.row.id, written.replayed))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    ids = {r[0] for r in results if not isinstance(r, BaseException)}
    firsts = [r for r in results if not isinstance(r, BaseException) and not r[1]]
    assert len(ids) == 1 and len(firsts) == 1


def test_racing_business_creates_make_one(pg_store: Store) -> None:
    business = f"race-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(12)
    outcomes: list[bool | BaseException] = []

    def create() -> None:
        try:
            barrier.wait()
            with session_scope(pg_store.factory) as session:
                outcomes.append(ensure_business(session, business_id=business)[1])
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=create) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    assert outcomes.count(True) == 1
    with session_scope(pg_store.factory) as session:
        assert tenants_repository.get_business(session, business_id=business) is not None


def test_the_jsonl_import_applies_the_same_rule() -> None:
    from services.settings import Settings

    lines = [
        json.dumps(
            {"id": "ok", "business_id": "b", "messages": [{"role": "customer", "text": "hi"}]}
        ),
        '{"id": "nul", "business_id": "b", "messages": [{"role": "customer", "text": "a\\u0000"}]}',
        '{"id": "nan", "business_id": "b", "meta": {"x": NaN}, "messages": []}',
        '{"id": "sur", "business_id": "b", "messages": [{"role": "customer", "text": "\\ud800"}]}',
    ]
    records, errors = parse_lines(lines, settings=Settings())
    assert [r.id for _, r in records] == ["ok"]
    assert [
        (e.line, ("NUL" in e.reason, "NaN" in e.reason, "surrogate" in e.reason)) for e in errors
    ] == [
        (2, (True, False, False)),
        (3, (False, True, False)),
        (4, (False, False, True)),
    ]


def test_strict_loads_by_hand() -> None:
    assert strict_loads('{"a": [1, 2.5, "x", {"b": null}]}') == {"a": [1, 2.5, "x", {"b": None}]}
    with pytest.raises(UnsafeInput) as info:
        strict_loads('{"a": [1, {"b": "\\u0000"}]}')
    assert info.value.where == "a.1.b"
    with pytest.raises(json.JSONDecodeError):
        strict_loads("{")


def test_a_missing_model_shows_clients_no_server_path(store: Store, tmp_path: Path) -> None:
    settings = store.settings.model_copy(update={"base_model": tmp_path / "nowhere"})
    with TestClient(create_app(settings)) as client:
        _, key = store.business_key()
        cid = client.post("/v1/conversations", json={}, headers=auth(key)).json()["id"]
        client.post(
            f"/v1/conversations/{cid}/messages",
            json={"role": "customer", "text": "hi"},
            headers=auth(key),
        )
        response = client.post(f"/v1/conversations/{cid}/suggestions", json={}, headers=auth(key))
        assert response.status_code == 503, response.text
        assert str(tmp_path) not in response.text and "models prepare" in response.text


def test_conflict_names_the_metadata(store: Store) -> None:
    business = f"meta-{uuid.uuid4().hex[:8]}"
    with session_scope(store.factory) as session:
        ensure_business(session, business_id=business)
        conversations.create_conversation(
            session, business_id=business, client_conversation_id="m", meta={"a": 1}
        )
    with pytest.raises(Conflict) as info, session_scope(store.factory) as session:
        conversations.create_conversation(
            session, business_id=business, client_conversation_id="m", meta=None
        )
    assert info.value.param == "metadata"
