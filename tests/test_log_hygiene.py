"""No API key and no customer or business text reaches the logs at INFO, through a whole
conversation with a suggestion (keys and text are customer data; logs are shipped elsewhere)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.db import session_scope
from services.experiments.service import ArmSpec, create_experiment
from services.generation.embedded import EmbeddedBackend
from services.policies.models import PolicyStatus
from services.policies.service import register_policy
from tests.conftest import Store, auth


def test_keys_and_conversation_text_stay_out_of_info_logs(
    sqlite_store: Store,
    tiny_model: Path,
    tiny_adapters: dict[str, Path],
    tiny_backend: EmbeddedBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_text = "my card number is 4111-1111 and I live at Zebra Street 9"
    business, key = sqlite_store.business_key()
    policy = f"pi0-{uuid.uuid4().hex[:6]}"
    with session_scope(sqlite_store.factory) as session:
        register_policy(
            session,
            policy_id=policy,
            base_model=str(tiny_model),
            adapter_uri=str(tiny_adapters["zero"]),
            status=PolicyStatus.APPROVED,
        )
        create_experiment(
            session, name="one", business_id=business, arms=[ArmSpec("control", policy, 1.0)]
        )
    settings = sqlite_store.settings.model_copy(update={"max_new_tokens": 8})
    with (
        caplog.at_level(logging.INFO),
        TestClient(create_app(settings, backend=tiny_backend)) as client,
    ):
        operator = sqlite_store.operator_key()
        cid = client.post("/v1/conversations", json={}, headers=auth(key)).json()["id"]
        client.post(
            f"/v1/conversations/{cid}/messages",
            json={"role": "customer", "text": secret_text},
            headers=auth(key),
        )
        suggested = client.post(f"/v1/conversations/{cid}/suggestions", json={}, headers=auth(key))
        assert suggested.status_code == 201, suggested.text
        client.post(
            f"/v1/conversations/{cid}/messages",
            json={"role": "business", "text": "Noted, Zebra Street it is."},
            headers=auth(key),
        )
        client.get("/v1/conversations/nope", headers=auth(key))  # an error path too
        client.get("/v1/businesses", headers=auth(operator))
        client.get("/v1/businesses", headers=auth("olk_not_a_real_key"))
    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert caplog.records, "nothing was logged at all: the check would prove nothing"
    for secret in (key, operator, "olk_not_a_real_key", "4111-1111", "Zebra Street"):
        assert secret not in logged, secret
