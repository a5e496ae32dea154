"""The one Settings object: the only place that reads the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("outcomeloop", appauthor=False))


class Settings(BaseSettings):
    """Configuration of every outcomeloop process, read from `OUTCOMELOOP_*` variables."""

    model_config = SettingsConfigDict(env_prefix="OUTCOMELOOP_", env_file=None, extra="ignore")

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Holds the embedded default's SQLite file, prepared models and artifacts.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the store (postgresql+psycopg://...). "
        "Unset: SQLite at DATA_DIR/outcomeloop.sqlite3 (the embedded default).",
    )
    db_pool_size: int = Field(default=10, ge=1, description="Connections kept per process.")
    db_max_overflow: int = Field(default=20, ge=0, description="Extra connections under load.")

    max_message_chars: int = Field(
        default=8000, ge=1, description="Longest accepted message or suggestion text."
    )
    edit_similarity_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="A business message at least this similar to the suggestion it answered "
        "counts as an edit of it; below, as a rejection.",
    )

    log_level: str = Field(default="INFO", description="Root log level.")

    @field_validator("database_url")
    @classmethod
    def _normalise_postgres_driver(cls, value: str | None) -> str | None:
        # People paste libpq URLs; SQLAlchemy would pick psycopg2, which we do not ship.
        if value and value.startswith(("postgres://", "postgresql://")):
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        return value or None

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'outcomeloop.sqlite3'}"

    @property
    def is_embedded(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
