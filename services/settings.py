"""The one Settings object: the only place that reads the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

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
    max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        description="Largest accepted request body; a larger one is a 413 (services/boundary.py).",
    )
    max_metadata_bytes: int = Field(
        default=16_384,
        ge=2,
        description="Largest accepted conversation `metadata`, as compact JSON (UTF-8 bytes).",
    )
    edit_similarity_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="A business message at least this similar to the suggestion it answered "
        "counts as an edit of it; below, as a rejection.",
    )

    log_level: str = Field(default="INFO", description="Root log level.")

    # -- suggestions -------------------------------------------------------------------------
    base_model: Path | None = Field(
        default=None,
        description="Local Hugging Face checkpoint of the base model every policy adapts. "
        "Unset: DATA_DIR/models/smollm2-135m-instruct (made by `outcomeloop models prepare`).",
    )
    generation_backend: Literal["embedded", "vllm"] = Field(
        default="embedded", description="embedded: in-process transformers; vllm: HTTP server."
    )
    vllm_url: str = Field(
        default="http://127.0.0.1:8001",
        description="Base URL of the vLLM OpenAI server; several replicas: URLs separated by "
        "commas (every adapter is loaded on each, requests go to the least busy one that is up).",
    )
    vllm_api_key: str | None = Field(default=None, description="Bearer key for vLLM, if any.")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Weights dtype of the embedded model. auto: bfloat16 on CUDA, float32 on "
        "CPU (faster than bfloat16 on CPUs without native bf16, and exact log-probs).",
    )
    max_context_tokens: int = Field(
        default=2048, ge=64, description="Prompt + completion budget; older turns are dropped."
    )
    max_new_tokens: int = Field(default=64, ge=1, le=1024, description="Suggestion length cap.")
    temperature: float = Field(
        default=0.7,
        ge=0.0,
        le=2.0,
        description="Sampling temperature of suggestions; policy improvement samples, scores and "
        "takes the KL at the same one. 0 = greedy (no iteration can improve a greedy policy).",
    )
    top_p: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus mass of suggestions (1.0 = off). The served policy is then "
        "softmax(logits / temperature) exactly, the distribution the logged log-probs, PPO, RLOO "
        "and GRPO all score; PPO also handles top_p < 1 (scoring over the nucleus), TRL's RLOO "
        "and GRPO do not.",
    )
    max_candidates: int = Field(default=4, ge=1, le=16, description="Largest `n` accepted.")
    generation_timeout_s: float = Field(
        default=30.0, gt=0, description="Give up on the backend after this many seconds."
    )
    on_backend_error: Literal["error", "abstain"] = Field(
        default="error",
        description="When the backend fails or times out: answer 503/504, or log and return an "
        "abstention.",
    )
    require_customer_turn: bool = Field(
        default=True,
        description="Refuse to suggest unless the latest message is the customer's (or none).",
    )
    embedded_engine: Literal["fast", "transformers"] = Field(
        default="fast",
        description="fast: workers/learning/engine.py (continuous batching, per-row LoRA arms, "
        "prefix reuse); transformers: generate() with peft, the reference it replaced.",
    )
    openmp: Literal["intel", "bundled"] = Field(
        default="intel",
        description="The OpenMP runtime of processes the CLI starts (demo, serve, iterate): "
        "intel re-executes them with Intel's libiomp5 preloaded where the intel-openmp wheel is "
        "installed (torch's bundled libgomp slows torch on worker threads; services/openmp.py).",
    )
    embedded_max_batch: int = Field(
        default=8, ge=1, description="Rows decoded together (fast) or requests per generate call."
    )
    embedded_batch_window_ms: float = Field(
        default=10.0, ge=0, description="How long the embedded backend waits to fill a batch."
    )

    # -- iterations and workers --------------------------------------------------------------
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Celery broker (Redis), JSON messages."
    )
    task_runner: Literal["inline", "celery"] | None = Field(
        default=None,
        description="Where iteration steps run: in this process (inline) or on Celery workers. "
        "Unset: inline on the embedded SQLite store, celery otherwise.",
    )
    celery_visibility_timeout_s: int = Field(
        default=6 * 3600,
        ge=1,
        description="Redis redelivers an unacknowledged task after this long: keep it above the "
        "longest step (a worker that died mid-step is recovered after it).",
    )
    step_lease_s: int = Field(
        default=6 * 3600,
        ge=1,
        description="A running step not finished after this long is taken over by a redelivery.",
    )
    metrics_token: str | None = Field(
        default=None,
        description="When set, GET /metrics needs 'Authorization: Bearer <token>' (it shows "
        "counts across tenants).",
    )
    beat_interval_s: float = Field(
        default=3600.0, gt=0, description="How often beat checks for enough new data."
    )
    beat_min_new_conversations: int = Field(
        default=200,
        ge=1,
        description="Ended conversations since the last iteration that trigger a new one.",
    )
    q_rank_floor: float = Field(
        default=0.0,
        ge=-1.0,
        lt=1.0,
        description="Gate: an iteration stops unless the lower end of the held-out interval of "
        "corr(Q - V, G - V) (Q ranks replies) lies above this (an operator may override).",
    )

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
    def base_model_path(self) -> Path:
        return self.base_model or self.data_dir / "models" / "smollm2-135m-instruct"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def runner(self) -> str:
        return self.task_runner or ("inline" if self.is_embedded else "celery")

    @property
    def is_embedded(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
