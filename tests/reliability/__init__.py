"""Load and fault scripts (run by hand; README "Reliability"), and what they share."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ADMIN_URL = os.environ.get(
    "OUTCOMELOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@dataclass(frozen=True)
class TinyWorld:
    """A fresh migrated Postgres database and a tiny model with a zero adapter in `work`."""

    url: str
    work: Path
    model: Path
    adapter: Path


@contextmanager
def tiny_world(prefix: str) -> Iterator[TinyWorld]:
    """A scratch database (dropped afterwards, even after a Postgres restart) and a tiny model."""
    from services.migrate import upgrade
    from tests.tiny_model import build_tiny_model
    from workers.learning.adapters import LoraSpec, create_zero_adapter

    work = Path(tempfile.mkdtemp(prefix=f"outcomeloop-{prefix}-"))
    model = build_tiny_model(work / "model")
    adapter = create_zero_adapter(model, work / "pi0", LoraSpec(r=4, alpha=8))
    name = f"outcomeloop_{prefix}_{uuid.uuid4().hex[:8]}"
    # pre-ping: a restart in between kills the pooled connection the drop would reuse
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield TinyWorld(url, work, model, adapter)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
