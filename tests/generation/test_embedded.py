"""The embedded backend on a tiny real model: adapters, mixed batches, log-probs, timeouts."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.generation.base import (
    AdapterMissing,
    AdapterRef,
    BackendTimeout,
    GenerationRequest,
    SamplingParams,
)
from services.generation.embedded import EmbeddedBackend
from services.policies.prompt import ChatMessage
from tests.tiny_model import OPINIONATED_GENERATION, with_generation_config

PROMPT = [
    ChatMessage("system", "You write for a kitchen business."),
    ChatMessage("user", "Hi, do you renovate kitchens?"),
]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module", params=["fast", "transformers"])
def backend(tiny_model: Path, request: pytest.FixtureRequest) -> Iterator[EmbeddedBackend]:
    engine = EmbeddedBackend(
        tiny_model, device="cpu", dtype="float32", batch_window_ms=50, engine=request.param
    )
    assert engine.engine_name == request.param
    yield engine
    engine.close()


def _greedy_base(tiny_model: Path, messages: list[ChatMessage], n_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    text = tokenizer.apply_chat_template(
        [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(
        **ids, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    return str(tokenizer.decode(new, skip_special_tokens=True))


def test_zero_adapter_reproduces_the_base_model(
    backend: EmbeddedBackend, tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    zero = AdapterRef("pi0", str(tiny_adapters["zero"]))
    result = backend.generate(GenerationRequest(PROMPT, zero, GREEDY), timeout=60)
    [completion] = result.completions
    assert completion.text == _greedy_base(tiny_model, PROMPT, GREEDY.max_new_tokens)
    assert completion.num_tokens > 0 and completion.logprob is not None
    assert completion.logprob <= 0.0
    assert result.prompt_tokens == backend.count_tokens(PROMPT)


def test_each_arm_gets_its_own_adapter_in_a_mixed_batch(
    backend: EmbeddedBackend, tiny_adapters: dict[str, Path]
) -> None:
    zero = AdapterRef("pi0", str(tiny_adapters["zero"]))
    noisy = AdapterRef("pi1", str(tiny_adapters["noisy"]))
    alone = {
        ref.name: backend.generate(GenerationRequest(PROMPT, ref, GREEDY), timeout=60)
        .completions[0]
        .text
        for ref in (zero, noisy)
    }
    assert alone["pi0"] != alone["pi1"], "the perturbed adapter must change the output"
    refs = [zero, noisy] * 4
    with ThreadPoolExecutor(len(refs)) as pool:
        texts = list(
            pool.map(
                lambda ref: (
                    backend.generate(GenerationRequest(PROMPT, ref, GREEDY), timeout=60)
                    .completions[0]
                    .text
                ),
                refs,
            )
        )
    assert texts == [alone[ref.name] for ref in refs]


def test_n_candidates_and_sampling(
    backend: EmbeddedBackend, tiny_adapters: dict[str, Path]
) -> None:
    ref = AdapterRef("pi1", str(tiny_adapters["noisy"]))
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, n=3, seed=7)
    first = backend.generate(GenerationRequest(PROMPT, ref, sampling), timeout=60)
    again = backend.generate(GenerationRequest(PROMPT, ref, sampling), timeout=60)
    assert len(first.completions) == 3
    assert [c.text for c in first.completions] == [c.text for c in again.completions]
    assert all(c.logprob is not None and c.logprob < 0 for c in first.completions)


def test_missing_adapter_and_timeout_fail_clearly(
    backend: EmbeddedBackend, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(AdapterMissing, match="no LoRA adapter"):
        backend.generate(
            GenerationRequest(PROMPT, AdapterRef("ghost", str(tmp_path)), GREEDY), timeout=10
        )
    ref = AdapterRef("pi0", str(tiny_adapters["zero"]))
    with pytest.raises(BackendTimeout):
        backend.generate(GenerationRequest(PROMPT, ref, GREEDY), timeout=0.0)


def test_logged_logprob_is_the_stated_distribution_whatever_the_base_config_says(
    tiny_model: Path,
    tiny_adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opinionated = with_generation_config(tiny_model, tmp_path / "model", **OPINIONATED_GENERATION)
    engine = EmbeddedBackend(
        opinionated, device="cpu", dtype="float32", batch_window_ms=0, engine="transformers"
    )
    ref = AdapterRef("pi1", str(tiny_adapters["noisy"]))
    engine.load_adapter(ref)
    sampled: list[torch.Tensor] = []
    real_generate = engine.model.generate

    def generate_keeping_sequences(*args: Any, **kwargs: Any) -> Any:
        out = real_generate(*args, **kwargs)
        sampled.append(out.sequences)
        return out

    monkeypatch.setattr(engine.model, "generate", generate_keeping_sequences)
    sampling = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=1.0, n=4, seed=3)
    try:
        result = engine.generate(GenerationRequest(PROMPT, ref, sampling), timeout=60)
    finally:
        engine.close()

    # Recompute each completion's log-prob as softmax(logits / T) of base + adapter, loaded
    # with plain peft. One prompt repeated n times: no padding in the batch.
    [sequences] = sampled
    prompt_length = engine.count_tokens(PROMPT)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tiny_adapters["noisy"]))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=sequences).logits[:, prompt_length - 1 : -1]
    logprobs = torch.log_softmax(logits / sampling.temperature, dim=-1)
    tokens = sequences[:, prompt_length:]
    token_logprobs = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    for row, completion in enumerate(result.completions):
        expected = float(token_logprobs[row, : completion.num_tokens].sum())
        assert completion.logprob == pytest.approx(expected, abs=1e-3), row


def test_fast_engine_logs_the_stated_distribution_whatever_the_base_config_says(
    tiny_model: Path,
    tiny_adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opinionated = with_generation_config(tiny_model, tmp_path / "model", **OPINIONATED_GENERATION)
    engine = EmbeddedBackend(opinionated, device="cpu", dtype="float32")
    assert engine.engine_name == "fast"
    drawn: list[Any] = []
    real_submit = engine.engine.submit

    def submit_keeping_samples(*args: Any, **kwargs: Any) -> Any:
        future = real_submit(*args, **kwargs)
        drawn.append(future)
        return future

    monkeypatch.setattr(engine.engine, "submit", submit_keeping_samples)
    ref = AdapterRef("pi1", str(tiny_adapters["noisy"]))
    sampling = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=1.0, n=4, seed=3)
    try:
        result = engine.generate(GenerationRequest(PROMPT, ref, sampling), timeout=60)
    finally:
        engine.close()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    prompt = tokenizer(
        tokenizer.apply_chat_template(
            [m.as_dict() for m in PROMPT], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    )["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tiny_adapters["noisy"]))
    model.eval()
    [future] = drawn
    for completion, sample in zip(result.completions, future.result(), strict=True):
        tokens = sample.tokens
        assert completion.num_tokens == len(tokens)
        assert completion.text == tokenizer.decode(tokens, skip_special_tokens=True)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[
                0, len(prompt) - 1 : -1
            ]
        expected = torch.log_softmax(logits / sampling.temperature, dim=-1)
        total = float(expected.gather(-1, torch.tensor(tokens)[:, None]).sum())
        assert completion.logprob == pytest.approx(total, abs=1e-3)
