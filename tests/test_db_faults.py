"""A database that goes away mid-request (a restart) costs that request a 503, never a dropped
connection: the session's teardown, after the route answered, must not raise."""

from __future__ import annotations

from types import SimpleNamespace

from sqlalchemy import text

from services.deps import get_session
from tests.conftest import Store


def test_a_dead_connection_at_teardown_is_dropped_not_raised(pg_store: Store) -> None:
    request = SimpleNamespace(
        app=SimpleNamespace(state=SimpleNamespace(session_factory=pg_store.factory))
    )
    dependency = get_session(request)  # type: ignore[arg-type]
    session = next(dependency)
    pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()  # holds a connection
    with pg_store.engine.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        admin.commit()
    dependency.close()  # runs the teardown: rollback on a dead connection (it raised before)
    with pg_store.factory() as fresh:  # the pool hands out a live connection afterwards
        assert fresh.execute(text("SELECT 1")).scalar_one() == 1
