"""`outcomeloop demo`: the embedded default end to end.

Today it serves the API on the embedded SQLite store, plays a short scripted business-customer
exchange against it over HTTP, and prints what was logged. The simulator and policy iterations
join it as they land.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from services.app import create_app
from services.db import make_engine, make_session_factory, session_scope
from services.migrate import upgrade
from services.settings import Settings
from services.tenants.models import Role
from services.tenants.service import create_api_key

SCRIPT: list[tuple[str, str]] = [
    ("customer", "Hi! Do you renovate bathrooms? Ours is about 6 square meters."),
    ("business", "We do! What would you like to change: tiles, shower, or everything?"),
    ("customer", "Everything, ideally before the summer."),
    ("business", "That works. Can we visit on Thursday to measure and give you a quote?"),
    ("customer", "Thursday is fine, book it."),
]


@contextmanager
def serve_in_thread(settings: Settings) -> Iterator[str]:
    """Run the real API under uvicorn in a background thread; yield its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def scripted_exchange(settings: Settings, business_id: str = "demo-renovations") -> dict[str, Any]:
    """Play SCRIPT through the HTTP API and return the stored conversation."""
    upgrade(settings.sqlalchemy_url)
    engine = make_engine(settings.sqlalchemy_url)
    with session_scope(make_session_factory(engine)) as session:
        key = create_api_key(session, role=Role.BUSINESS, business_id=business_id, label="demo")
    engine.dispose()
    with (
        serve_in_thread(settings) as base_url,
        httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as http,
    ):
        conversation = http.post("/v1/conversations", json={"metadata": {"demo": True}})
        conversation.raise_for_status()
        cid = conversation.json()["id"]
        for number, (role, text) in enumerate(SCRIPT):
            http.post(
                f"/v1/conversations/{cid}/messages",
                json={"role": role, "text": text, "client_message_id": f"demo-{number}"},
            ).raise_for_status()
        http.post(
            f"/v1/conversations/{cid}/outcome", json={"label": "visit_booked"}
        ).raise_for_status()
        http.post(f"/v1/conversations/{cid}/close", json={"reason": "outcome"}).raise_for_status()
        stored = http.get(f"/v1/conversations/{cid}")
        stored.raise_for_status()
        result: dict[str, Any] = stored.json()
        return result
