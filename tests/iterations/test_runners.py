"""One runner abstraction: the API, the CLI and the demo are handed a StepRunner, picked once
from the settings; `outcomeloop serve` hands the API the in-process one."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.db import session_scope
from services.errors import NotFound
from services.iterations import service
from services.iterations.models import Step
from services.iterations.runner import CeleryRunner
from services.iterations.schemas import parse_iteration_request
from services.policies.models import PolicyStatus
from services.policies.service import register_policy
from services.settings import get_settings
from tests.conftest import Store, auth
from tests.server import running_server
from workers.runner import BlockingRunner, ThreadRunner, runner_for


def _iteration_without_data(store: Store) -> str:
    """An iteration whose returns step fails at once: its business has no conversations."""
    policy = f"p-{uuid.uuid4().hex[:8]}"
    request = parse_iteration_request(
        {"parent_policy_id": policy, "data": {"business_id": f"empty-{uuid.uuid4().hex[:8]}"}}
    )
    with session_scope(store.factory) as session:
        register_policy(
            session,
            policy_id=policy,
            base_model="/m",
            adapter_uri="/a",
            status=PolicyStatus.APPROVED,
        )
        return service.create_iteration(session, settings=store.settings, request=request).id


def _status(store: Store, iteration_id: str) -> tuple[str, str | None]:
    with session_scope(store.factory) as session:
        it = service.get_iteration(session, iteration_id=iteration_id)
        return it.status, it.error


def test_the_settings_pick_the_runner(sqlite_store: Store) -> None:
    inline = sqlite_store.settings
    celery = inline.model_copy(update={"task_runner": "celery"})
    assert isinstance(runner_for(celery), CeleryRunner)
    assert isinstance(runner_for(celery, blocking=True), CeleryRunner)
    assert isinstance(runner_for(inline, sqlite_store.factory), ThreadRunner)
    assert isinstance(runner_for(inline, sqlite_store.factory, blocking=True), BlockingRunner)


def test_the_blocking_runner_returns_when_the_iteration_stops(sqlite_store: Store) -> None:
    iteration_id = _iteration_without_data(sqlite_store)
    beats: list[str] = []
    runner = BlockingRunner(
        sqlite_store.settings, sqlite_store.factory, heartbeat=beats.append, interval_s=0.05
    )
    runner.submit(iteration_id, Step.RETURNS)
    status, error = _status(sqlite_store, iteration_id)
    assert status == "failed" and "no training data" in (error or "")
    assert beats and set(beats) == {iteration_id}


def test_the_blocking_runner_raises_what_its_helper_thread_raised(sqlite_store: Store) -> None:
    runner = BlockingRunner(sqlite_store.settings, sqlite_store.factory, heartbeat=lambda _: None)
    with pytest.raises(NotFound, match="no-such-iteration"):
        runner.submit("no-such-iteration", Step.RETURNS)


def test_the_thread_runner_returns_at_once(sqlite_store: Store) -> None:
    iteration_id = _iteration_without_data(sqlite_store)
    ThreadRunner(sqlite_store.settings, sqlite_store.factory).submit(iteration_id, Step.RETURNS)
    deadline = time.monotonic() + 30
    while _status(sqlite_store, iteration_id)[0] != "failed":
        assert time.monotonic() < deadline, _status(sqlite_store, iteration_id)
        time.sleep(0.05)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("OUTCOMELOOP_DATABASE_URL", raising=False)
    monkeypatch.delenv("OUTCOMELOOP_TASK_RUNNER", raising=False)
    monkeypatch.setenv("OUTCOMELOOP_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_the_served_app_is_handed_the_runner_of_its_settings(env: pytest.MonkeyPatch) -> None:
    from services.cli import api_app

    assert isinstance(api_app().state.runner, ThreadRunner)
    env.setenv("OUTCOMELOOP_TASK_RUNNER", "celery")
    get_settings.cache_clear()
    assert isinstance(api_app().state.runner, CeleryRunner)


def test_outcomeloop_serve_runs_steps_in_the_server(sqlite_store: Store, tmp_path: Path) -> None:
    """The real `outcomeloop serve` on the embedded default: a created iteration's first step
    runs in the server process (here it fails at once: no data)."""
    operator = sqlite_store.operator_key()
    policy = f"p-{uuid.uuid4().hex[:8]}"
    with session_scope(sqlite_store.factory) as session:
        register_policy(
            session,
            policy_id=policy,
            base_model="/m",
            adapter_uri="/a",
            status=PolicyStatus.APPROVED,
        )
    server_env = {
        "OUTCOMELOOP_DATABASE_URL": sqlite_store.settings.sqlalchemy_url,
        "OUTCOMELOOP_DATA_DIR": str(tmp_path),
        "OUTCOMELOOP_LOG_LEVEL": "WARNING",
    }
    with (
        running_server(server_env, tmp_path / "server.log") as url,
        httpx.Client(base_url=url, headers=auth(operator), timeout=10) as http,
    ):
        created = http.post(
            "/v1/iterations",
            json={"parent_policy_id": policy, "data": {"business_id": "nobody"}},
        )
        assert created.status_code == 201, created.text
        deadline = time.monotonic() + 30
        while (body := http.get(f"/v1/iterations/{created.json()['id']}").json())[
            "status"
        ] != "failed":
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
    assert "no training data" in body["error"]


def test_an_unreachable_queue_fails_the_iteration_fast_and_retry_resumes_it(
    store: Store,
) -> None:
    """Redis down when an iteration is created: a 503 within seconds (was a 500, and the
    iteration sat `queued` forever, refused by retry and blocking automatic iterations)."""
    from fastapi.testclient import TestClient

    from services.app import create_app
    from services.iterations import repository

    down = store.settings.model_copy(
        update={"task_runner": "celery", "redis_url": "redis://127.0.0.1:9/0"}  # nothing listens
    )
    policy = f"p-{uuid.uuid4().hex[:8]}"
    with session_scope(store.factory) as session:
        register_policy(
            session,
            policy_id=policy,
            base_model="/m",
            adapter_uri="/a",
            status=PolicyStatus.APPROVED,
        )
    operator = store.operator_key()
    with TestClient(create_app(down, runner=CeleryRunner(down))) as client:
        started = time.monotonic()
        response = client.post(
            "/v1/iterations",
            json={"parent_policy_id": policy, "data": {"business_id": "nobody"}},
            headers=auth(operator),
        )
        elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert "retry" in response.json()["error"]["message"] and elapsed < 20, elapsed
    with session_scope(store.factory) as session:
        [iteration] = [
            it
            for it in repository.page_iterations(session, after=None, limit=100)[0]
            if it.parent_policy_id == policy
        ]
        assert iteration.status == "failed" and iteration.current_step == "returns"
        assert "could not queue" in (iteration.error or "")
        # not in flight: it no longer keeps beat from starting an automatic iteration
        assert iteration.id not in {it.id for it in repository.active_iterations(session)}
        iteration_id = iteration.id
    # The queue is back (here: the in-process runner): retry resumes at the step never queued.
    with TestClient(
        create_app(store.settings, runner=BlockingRunner(store.settings, store.factory))
    ) as client:
        retried = client.post(
            f"/v1/iterations/{iteration_id}/retry", json={}, headers=auth(operator)
        )
    assert retried.status_code == 200, retried.text
    status, error = _status(store, iteration_id)
    assert status == "failed" and error is not None and "no training data" in error
