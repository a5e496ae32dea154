"""End to end against a real uvicorn server process, on Postgres and on the embedded SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Store, auth
from tests.server import running_server


@pytest.fixture
def live_url(store: Store, tmp_path: Path) -> Iterator[str]:
    env = {
        "OUTCOMELOOP_DATABASE_URL": store.settings.sqlalchemy_url,
        "OUTCOMELOOP_DATA_DIR": str(tmp_path),
        "OUTCOMELOOP_LOG_LEVEL": "WARNING",
    }
    with running_server(env, tmp_path / "server.log") as url:
        yield url


def test_scripted_exchange_over_http(live_url: str, store: Store) -> None:
    _, key = store.business_key()
    with httpx.Client(base_url=live_url, headers=auth(key), timeout=10) as http:
        cid = http.post("/v1/conversations", json={}).json()["id"]
        for role, text in [
            ("customer", "Hi, is the blue sofa in stock?"),
            ("business", "It is! Would you like to reserve it?"),
            ("customer", "Yes please."),
        ]:
            assert (
                http.post(
                    f"/v1/conversations/{cid}/messages", json={"role": role, "text": text}
                ).status_code
                == 201
            )
        assert (
            http.post(f"/v1/conversations/{cid}/outcome", json={"label": "reservation"}).status_code
            == 201
        )
        assert (
            http.post(f"/v1/conversations/{cid}/close", json={"reason": "outcome"}).status_code
            == 200
        )
        body = http.get(f"/v1/conversations/{cid}").json()
    assert [m["text"] for m in body["messages"]][-1] == "Yes please."
    assert body["outcomes"][0]["seq"] == 3 and body["end_reason"] == "outcome"


def test_concurrent_appends_keep_a_consistent_order(live_url: str, store: Store) -> None:
    """32 clients append to one conversation at once, each sending every message twice."""
    _, key = store.business_key()
    clients, per_client = 32, 8
    with httpx.Client(base_url=live_url, headers=auth(key), timeout=30) as http:
        cid = http.post("/v1/conversations", json={}).json()["id"]

    def run(client_no: int) -> list[int]:
        seqs = []
        with httpx.Client(base_url=live_url, headers=auth(key), timeout=30) as http:
            for j in range(per_client):
                body = {
                    "role": "customer",
                    "text": f"c{client_no} m{j}",
                    "client_message_id": f"c{client_no}-m{j}",
                }
                first = http.post(f"/v1/conversations/{cid}/messages", json=body)
                retry = http.post(f"/v1/conversations/{cid}/messages", json=body)
                assert first.status_code == retry.status_code == 201, first.text
                assert first.json()["seq"] == retry.json()["seq"]
                seqs.append(first.json()["seq"])
        return seqs

    with ThreadPoolExecutor(clients) as pool:
        per_thread = list(pool.map(run, range(clients)))

    for seqs in per_thread:
        assert seqs == sorted(seqs), "a client's messages must keep the order it sent them in"
    with httpx.Client(base_url=live_url, headers=auth(key), timeout=30) as http:
        body = http.get(f"/v1/conversations/{cid}").json()
    stored = body["messages"]
    assert [m["seq"] for m in stored] == list(range(1, clients * per_client + 1))
    assert body["message_count"] == clients * per_client
    assert sorted(m["client_message_id"] for m in stored) == sorted(
        f"c{i}-m{j}" for i in range(clients) for j in range(per_client)
    )
