"""The backend interface. Every arm, the control included, is a LoRA adapter on one base."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from services.policies.prompt import ChatMessage


class BackendError(Exception):
    """The backend could not produce a completion."""


class BackendTimeout(BackendError):
    pass


class BackendUnavailable(BackendError):
    pass


class AdapterMissing(BackendError):
    pass


@dataclass(frozen=True)
class AdapterRef:
    """A policy as the backend sees it: a versioned name and where its weights live."""

    name: str
    path: str


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: softmax(logits / temperature) cut to the top_p nucleus, nothing else.

    Backends pin every other sampling option to its neutral value (whatever the model's
    generation_config.json says), so that a completion's log-prob is of exactly this
    distribution, the one policy improvement scores. temperature 0 is greedy. seed is honoured
    by the embedded backend only: vLLM is never sent one (see vllm.py).
    """

    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    n: int = 1
    seed: int | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "n": self.n,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[ChatMessage]
    adapter: AdapterRef
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Completion:
    text: str
    logprob: float | None  # sum of token log-probs under the sampling distribution
    num_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class GenerationResult:
    completions: list[Completion]
    prompt_tokens: int


class GenerationBackend(Protocol):
    name: str
    max_context_tokens: int

    def generate(self, request: GenerationRequest, *, timeout: float) -> GenerationResult:
        """Sample `request.sampling.n` completions; raise BackendError subclasses on failure."""
        ...

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        """Prompt length in tokens, chat template and generation prompt included."""
        ...

    def load_adapter(self, adapter: AdapterRef) -> None:
        """Make an adapter servable (idempotent)."""
        ...

    def unload_adapter(self, name: str) -> None: ...

    def close(self) -> None: ...
