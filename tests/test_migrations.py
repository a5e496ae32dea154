"""The migrations build the schema the models describe, on both backends, and reverse cleanly."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, inspect

from services.migrate import alembic_config, check, upgrade
from tests.conftest import Store

TABLES = {"businesses", "api_keys", "conversations", "messages", "suggestions", "outcomes"}


def test_models_and_migrations_agree(store: Store) -> None:
    check(store.settings.sqlalchemy_url)  # raises if autogenerate would emit anything


def test_downgrade_to_base_and_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    upgrade(url)
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    command.downgrade(alembic_config(url), "base")
    assert not TABLES & set(inspect(engine).get_table_names())
    upgrade(url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    engine.dispose()
