"""Build the configured backend (the API process imports torch only for `embedded`)."""

from __future__ import annotations

from services.errors import DomainError
from services.generation.base import GenerationBackend
from services.settings import Settings


class ModelNotPrepared(DomainError):
    """No base model where the settings point. Its message is what API clients see (no server
    path); `detail` says where it was looked for, for the logs and the operator's CLI."""

    status_code = 503
    code = "unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(
            "suggestions are unavailable until an operator prepares the model "
            "(outcomeloop models prepare)"
        )
        self.detail = detail


def build_backend(settings: Settings) -> GenerationBackend:
    if settings.generation_backend == "vllm":
        from services.generation.vllm import VllmBackend

        return VllmBackend(
            settings.vllm_url,  # one URL, or several replicas separated by commas
            api_key=settings.vllm_api_key,
            max_context_tokens=settings.max_context_tokens,
        )
    path = settings.base_model_path
    if not (path / "config.json").is_file():
        raise ModelNotPrepared(
            f"no base model at {path}; run `outcomeloop models prepare` "
            "(or set OUTCOMELOOP_BASE_MODEL to a local checkpoint)"
        )
    from services.generation.embedded import EmbeddedBackend

    return EmbeddedBackend(
        path,
        device=settings.device,
        dtype=settings.dtype,
        max_context_tokens=settings.max_context_tokens,
        max_batch_size=settings.embedded_max_batch,
        batch_window_ms=settings.embedded_batch_window_ms,
        engine=settings.embedded_engine,
    )


class BackendHolder:
    """The process's one backend, built at start-up or on first use (if the model was not
    prepared yet when the API started)."""

    def __init__(self, settings: Settings, backend: GenerationBackend | None = None) -> None:
        import threading

        self._settings = settings
        self._backend = backend
        self._owned = backend is None  # an injected backend belongs to its creator
        self._lock = threading.Lock()

    def get(self) -> GenerationBackend:
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = build_backend(self._settings)
        return self._backend

    @property
    def ready(self) -> bool:
        return self._backend is not None

    def close(self) -> None:
        if self._backend is not None and self._owned:
            self._backend.close()
