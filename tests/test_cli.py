"""The `outcomeloop` command line on the embedded default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from services.app import create_app
from services.cli import app
from services.settings import get_settings
from tests.conftest import auth


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("OUTCOMELOOP_DATABASE_URL", raising=False)
    monkeypatch.setenv("OUTCOMELOOP_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_keys_create_prints_a_working_key(embedded: Path) -> None:
    runner = CliRunner()
    business = runner.invoke(app, ["keys", "create", "--business", "acme"])
    operator = runner.invoke(app, ["keys", "create", "--operator"])
    assert business.exit_code == 0 and operator.exit_code == 0, business.output + operator.output
    business_key, operator_key = business.stdout.strip(), operator.stdout.strip()
    assert business_key.startswith("olk_") and business_key != operator_key
    assert (embedded / "outcomeloop.sqlite3").exists()
    with TestClient(create_app(get_settings())) as client:
        created = client.post("/v1/conversations", json={}, headers=auth(business_key))
        assert created.status_code == 201 and created.json()["business_id"] == "acme"
        listed = client.get("/v1/businesses", headers=auth(operator_key))
        assert [b["id"] for b in listed.json()] == ["acme"]


def test_keys_create_refuses_ambiguous_or_bad_input(embedded: Path) -> None:
    runner = CliRunner()
    both = runner.invoke(app, ["keys", "create", "--business", "acme", "--operator"])
    neither = runner.invoke(app, ["keys", "create"])
    bad_slug = runner.invoke(app, ["keys", "create", "--business", "Acme Inc"])
    assert both.exit_code == neither.exit_code == bad_slug.exit_code == 2
    assert "exactly one" in both.output and "exactly one" in neither.output
    assert "Acme Inc" in bad_slug.output
