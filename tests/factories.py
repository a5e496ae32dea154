"""Plain factory functions for tests."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from services.conversations.service import record_suggestion
from services.db import session_scope
from tests.conftest import Store, auth


def new_conversation(client: TestClient, key: str, **body: Any) -> str:
    response = client.post("/v1/conversations", json=body, headers=auth(key))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def say(
    client: TestClient, key: str, conversation_id: str, role: str, text: str, **extra: Any
) -> dict[str, Any]:
    response = client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"role": role, "text": text, **extra},
        headers=auth(key),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def logged_suggestion(
    store: Store, business_id: str, conversation_id: str, text: str | None, **extra: Any
) -> str:
    """A suggestion as the suggestion endpoint would log it (that endpoint comes with serving)."""
    with session_scope(store.factory) as session:
        written = record_suggestion(
            session,
            settings=store.settings,
            business_id=business_id,
            conversation_id=conversation_id,
            text=text,
            **extra,
        )
        return written.row.id
