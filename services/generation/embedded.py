"""In-process generation: one base model and one LoRA adapter per arm.

Two engines. `fast` (the default) is workers/learning/engine.py: continuous batching, each row
its own arm, the KV of a prompt's seen prefix reused (measured in tests/benchmarks/
generation_speed.py). `transformers` is the reference it replaced, kept for checkpoints the fast
engine does not reproduce (it says so at start-up and this backend falls back): a worker thread
drains the queue for up to `batch_window_ms` and runs requests with the same sampling settings
as one `generate` call with peft's mixed-adapter batches. torch is imported only when this
backend is built, so the API process never loads it unless it serves embedded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from workers.learning.policy_model import NEUTRAL_GENERATION, neutralise_generation_config

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class _Job:
    request: GenerationRequest
    future: Future[GenerationResult]
    deadline: float


class EmbeddedBackend:
    name = "embedded"

    def __init__(
        self,
        base_model_path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_context_tokens: int = 2048,
        max_batch_size: int = 8,
        batch_window_ms: float = 10.0,
        engine: str = "fast",
        prefix_cache_tokens: int = 4096,
    ) -> None:
        if engine not in ("fast", "transformers"):
            raise ValueError(f"engine must be 'fast' or 'transformers', not {engine!r}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.base: Any = AutoModelForCausalLM.from_pretrained(
            str(base_model_path), dtype=getattr(torch, dtype)
        )
        neutralise_generation_config(self.base)
        self.base.to(self.device)  # type: ignore[arg-type]
        self.base.eval()
        model_limit = int(getattr(self.base.config, "max_position_embeddings", max_context_tokens))
        self.max_context_tokens = min(max_context_tokens, model_limit)
        self.model: Any = None  # a PeftModel once the first adapter is loaded
        self._adapters: dict[str, str] = {}
        self._model_lock = threading.Lock()
        self._max_batch = max_batch_size
        self._window = batch_window_ms / 1000.0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._eos = self._eos_ids()
        self.engine: Any = None  # the fast DecodeEngine, when the checkpoint allows it
        if engine == "fast":
            from workers.learning.engine import DecodeEngine, UnsupportedModel

            try:
                self.engine = DecodeEngine(
                    self.base,
                    end_token_ids=sorted(self._eos),
                    max_batch=max_batch_size,
                    max_positions=self.max_context_tokens,
                    prefix_cache_tokens=prefix_cache_tokens,
                )
            except UnsupportedModel as exc:
                log.warning("the fast engine cannot serve this checkpoint (%s): transformers", exc)
        self.engine_name = "fast" if self.engine is not None else "transformers"
        if self.engine is not None:
            self.base = None  # the engine holds what it needs (q/k/v and gate/up fused)
        else:
            self._worker = threading.Thread(
                target=self._loop, name="embedded-generation", daemon=True
            )
            self._worker.start()

    # -- adapters ---------------------------------------------------------------------------

    def load_adapter(self, adapter: AdapterRef) -> None:
        from peft import PeftModel

        with self._model_lock:
            if adapter.name in self._adapters:
                return
            if not (Path(adapter.path) / "adapter_config.json").is_file():
                raise AdapterMissing(f"no LoRA adapter at {adapter.path} for {adapter.name}")
            if self.engine is not None:
                from workers.learning.engine import UnsupportedModel

                try:
                    self.engine.load_arm(adapter.name, adapter.path)
                except UnsupportedModel as exc:
                    raise BackendError(f"adapter {adapter.name} at {adapter.path}: {exc}") from None
                self._adapters[adapter.name] = adapter.path
                log.info("loaded adapter %s from %s", adapter.name, adapter.path)
                return
            if self.model is None:
                self.model = PeftModel.from_pretrained(
                    self.base, adapter.path, adapter_name=adapter.name
                )
            else:
                self.model.load_adapter(adapter.path, adapter_name=adapter.name)
            self.model.eval()
            self._adapters[adapter.name] = adapter.path
            log.info("loaded adapter %s from %s", adapter.name, adapter.path)

    def unload_adapter(self, name: str) -> None:
        with self._model_lock:
            if name in self._adapters and self.engine is not None:
                self.engine.remove_arm(name)
                del self._adapters[name]
            elif name in self._adapters and self.model is not None:
                self.model.delete_adapter(name)
                del self._adapters[name]

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    # -- prompts ----------------------------------------------------------------------------

    def render(self, messages: list[ChatMessage]) -> str:
        text = self.tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"])

    # -- generation -------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, *, timeout: float) -> GenerationResult:
        if self._closed:
            raise BackendUnavailable("the embedded backend is shut down")
        self.load_adapter(request.adapter)
        if self.engine is not None:
            return self._generate_fast(request, timeout)
        job = _Job(request, Future(), time.monotonic() + timeout)
        self._queue.put(job)
        try:
            return job.future.result(timeout=timeout + 1.0)
        except FutureTimeout:
            raise BackendTimeout(f"embedded generation timed out after {timeout:.1f}s") from None

    def _generate_fast(self, request: GenerationRequest, timeout: float) -> GenerationResult:
        from workers.learning.engine import DecodeParams, EngineClosed, EngineTimeout

        if timeout <= 0:
            raise BackendTimeout("embedded generation timed out while queued")
        sampling = request.sampling
        prompt = self.tokenizer(self.render(request.messages), add_special_tokens=False)
        ids = list(prompt["input_ids"])
        try:
            params = DecodeParams(
                max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                n=sampling.n,
                seed=sampling.seed,
            )
            future = self.engine.submit(
                ids, request.adapter.name, params, deadline=time.monotonic() + timeout
            )
            samples = future.result(timeout=timeout + 1.0)
        except (EngineTimeout, FutureTimeout):
            raise BackendTimeout(f"embedded generation timed out after {timeout:.1f}s") from None
        except EngineClosed:
            raise BackendUnavailable("the embedded backend is shut down") from None
        except (KeyError, ValueError) as exc:
            raise BackendError(f"generation refused: {exc}") from None
        except Exception as exc:
            log.exception("embedded generation failed")
            raise BackendError(f"generation failed: {exc}") from None
        return GenerationResult(
            [
                Completion(
                    str(self.tokenizer.decode(s.tokens, skip_special_tokens=True)),
                    s.logprob,
                    len(s.tokens),
                    s.finish_reason,
                )
                for s in samples
            ],
            prompt_tokens=len(ids),
        )

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            key = first.request.sampling
            held: list[_Job] = []
            until = time.monotonic() + self._window
            while len(batch) < self._max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                (batch if job.request.sampling == key else held).append(job)
            for job in held:  # different sampling settings: next round
                self._queue.put(job)
            try:
                results = self._run(batch)
                for job, result in zip(batch, results, strict=True):
                    job.future.set_result(result)
            except Exception as exc:  # report to every waiting request, keep serving
                if not isinstance(exc, BackendError):
                    log.exception("embedded generation failed")
                    exc = BackendError(f"generation failed: {exc}")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _run(self, batch: list[_Job]) -> list[GenerationResult]:
        torch = self._torch
        sampling = batch[0].request.sampling
        texts: list[str] = []
        adapter_names: list[str] = []
        for job in batch:
            rendered = self.render(job.request.messages)
            texts.extend([rendered] * sampling.n)
            adapter_names.extend([job.request.adapter.name] * sampling.n)
        encoded = self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.device)
        prompt_len = int(encoded["input_ids"].shape[1])
        remaining = min(job.deadline for job in batch) - time.monotonic()
        if remaining <= 0:
            raise BackendTimeout("embedded generation timed out while queued")
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        do_sample = sampling.temperature > 0
        kwargs: dict[str, Any] = {
            **NEUTRAL_GENERATION,
            "max_new_tokens": sampling.max_new_tokens,
            "do_sample": do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
            "return_dict_in_generate": True,
            "output_scores": True,
            "max_time": remaining,
        }
        if do_sample:
            # top_k=0: transformers would otherwise apply its default top_k=50, and the
            # logged log-probs would not be those of the stated sampling distribution.
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with self._model_lock, torch.inference_mode():
            out = self.model.generate(**encoded, adapter_names=adapter_names, **kwargs)
            scores = self.model.base_model.model.compute_transition_scores(
                out.sequences, out.scores, normalize_logits=True
            )
        generated = out.sequences[:, prompt_len:]
        eos_ids = self._eos
        completions: list[Completion] = []
        for row in range(generated.shape[0]):
            tokens = generated[row].tolist()
            length = len(tokens)
            finish = "length"
            for i, token in enumerate(tokens):
                if token in eos_ids:
                    length, finish = i + 1, "stop"
                    break
            logprob = float(scores[row, :length].float().sum().item()) if length else 0.0
            text = str(self.tokenizer.decode(tokens[:length], skip_special_tokens=True))
            completions.append(Completion(text, logprob, length, finish))
        prompt_tokens = [int(m.sum().item()) for m in encoded["attention_mask"]]
        return [
            GenerationResult(
                completions[i * sampling.n : (i + 1) * sampling.n],
                prompt_tokens=prompt_tokens[i * sampling.n],
            )
            for i in range(len(batch))
        ]

    def _eos_ids(self) -> set[int]:
        ids = self.base.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return set(ids if isinstance(ids, list) else [ids])

    def close(self) -> None:
        self._closed = True
        if self.engine is not None:
            self.engine.close()
            return
        self._queue.put(None)
        self._worker.join(timeout=5)
