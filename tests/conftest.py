"""Fixtures: a real Postgres database per run (migrated with Alembic), a SQLite store, apps."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from services.app import create_app
from services.db import make_engine, make_session_factory, session_scope
from services.migrate import upgrade
from services.settings import Settings
from services.tenants.models import Role
from services.tenants.service import create_api_key

ADMIN_URL = os.environ.get(
    "OUTCOMELOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("OUTCOMELOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _postgres_available() -> str | None:
    try:
        engine = create_engine(ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any driver error means "not reachable"
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test run, migrated with `alembic upgrade head`, then dropped."""
    yield from fresh_postgres_database()


def fresh_postgres_database() -> Iterator[str]:
    """A fresh migrated database of its own (the body of a fixture: skip, or fail in CI, when
    PostgreSQL is not reachable)."""
    problem = _postgres_available()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {ADMIN_URL} is required in CI: {problem}")
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_URL} ({problem}); CI always runs these")
    name = f"outcomeloop_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sqlite") / "outcomeloop.sqlite3"
    url = f"sqlite:///{path}"
    upgrade(url)
    return url


@pytest.fixture
def broker() -> Iterator[str]:
    """A real Redis database of its own for this test, emptied before and after."""
    import random

    import redis

    url = f"{REDIS_URL}/{random.randint(1, 15)}"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} is required in CI: {exc}")
        pytest.skip(f"Redis not reachable at {REDIS_URL}; CI always runs these")
    client.flushdb()
    yield url
    client.flushdb()


@dataclass
class Store:
    """A migrated database and everything tests need to reach it."""

    kind: str
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]

    def business_key(self, business_id: str | None = None) -> tuple[str, str]:
        business_id = business_id or f"biz-{uuid.uuid4().hex[:8]}"
        with session_scope(self.factory) as session:
            key = create_api_key(session, role=Role.BUSINESS, business_id=business_id)
        return business_id, key

    def operator_key(self) -> str:
        with session_scope(self.factory) as session:
            return create_api_key(session, role=Role.OPERATOR)


def _store(kind: str, url: str, data_dir: Path) -> Iterator[Store]:
    settings = Settings(database_url=url, data_dir=data_dir)
    engine = make_engine(url)
    try:
        yield Store(kind, settings, engine, make_session_factory(engine))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same tests run against SQLite (the embedded default) and a real Postgres."""
    url = request.getfixturevalue(f"{request.param}_url")
    yield from _store(request.param, url, tmp_path)


@pytest.fixture
def pg_store(postgres_url: str, tmp_path: Path) -> Iterator[Store]:
    yield from _store("postgres", postgres_url, tmp_path)


@pytest.fixture
def sqlite_store(sqlite_url: str, tmp_path: Path) -> Iterator[Store]:
    """The embedded default's store alone, for tests whose subject is not the store."""
    yield from _store("sqlite", sqlite_url, tmp_path)


@pytest.fixture
def client(store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(store.settings)) as test_client:
        yield test_client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + tokenizer (see tests/tiny_model.py)."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A zero-initialised adapter (= the base model) and a perturbed one (differs from it)."""
    from workers.learning.adapters import LoraSpec, create_zero_adapter, perturb_adapter

    root = tmp_path_factory.mktemp("adapters")
    zero = create_zero_adapter(tiny_model, root / "zero", LoraSpec(r=4, alpha=8))
    noisy = perturb_adapter(zero, root / "noisy", scale=0.5, seed=1)
    return {"zero": zero, "noisy": noisy}


@pytest.fixture(scope="session")
def tiny_backend(tiny_model: Path) -> Iterator[object]:
    """One embedded backend on the tiny model, shared by the API tests (loading is the cost)."""
    from services.generation.embedded import EmbeddedBackend

    backend = EmbeddedBackend(tiny_model, device="cpu", dtype="float32", max_context_tokens=512)
    yield backend
    backend.close()
