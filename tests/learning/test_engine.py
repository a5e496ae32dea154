"""The fast decoder against transformers + peft, the definition it must reproduce (tiny model)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TopPLogitsWarper

from workers.learning import engine as engine_module
from workers.learning.adapters import LoraSpec, create_zero_adapter, perturb_adapter
from workers.learning.engine import (
    DecodeEngine,
    DecodeParams,
    EngineTimeout,
    LoraArm,
    UnsupportedModel,
    lora_scales,
)

SYSTEM = "You write for a kitchen business."
QUESTIONS = [
    "Hi, do you renovate kitchens?",
    "What is the price of the blue sofa?",
    "Can we book a visit on Thursday at 10am?",
    "I am not sure yet, I will think about it.",
]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def arms(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path_factory: Any
) -> dict[str, Path]:
    """pi0 (zero B: the base), an attention LoRA and a LoRA on every linear layer."""
    root = tmp_path_factory.mktemp("engine-adapters")
    wide = create_zero_adapter(
        tiny_model, root / "wide0", LoraSpec(r=4, alpha=8, target_modules=ALL_LINEAR)
    )
    return {
        "pi0": tiny_adapters["zero"],
        "attn": tiny_adapters["noisy"],
        "wide": perturb_adapter(wide, root / "wide", scale=0.5, seed=2),
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_model))


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_engine(tiny_model: Path, arms: dict[str, Path], **kwargs: Any) -> DecodeEngine:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    engine = DecodeEngine(base, end_token_ids=[tokenizer.eos_token_id], **kwargs)
    for name, path in arms.items():
        engine.load_arm(name, path)
    return engine


@pytest.fixture(scope="module")
def engine(tiny_model: Path, arms: dict[str, Path]) -> Iterator[DecodeEngine]:
    built = make_engine(tiny_model, arms, max_batch=8)
    yield built
    built.close()


def peft_model(tiny_model: Path, adapter: Path) -> Any:
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return model


def reference_greedy(model: Any, tokenizer: Any, ids: list[int], n_tokens: int) -> list[int]:
    out = model.generate(
        input_ids=torch.tensor([ids]),
        max_new_tokens=n_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return list(out[0, len(ids) :].tolist())


def test_greedy_tokens_equal_peft_generate_for_every_arm(
    engine: DecodeEngine, tiny_model: Path, arms: dict[str, Path], tokenizer: Any
) -> None:
    outputs = {}
    for name, path in arms.items():
        model = peft_model(tiny_model, path)
        for question in QUESTIONS:
            ids = prompt_ids(tokenizer, question)
            [sample] = engine.generate(ids, name, DecodeParams(max_new_tokens=16, temperature=0))
            assert sample.tokens == reference_greedy(model, tokenizer, ids, 16), (name, question)
            outputs[name, question] = sample.tokens
    # The arms really differ (else equality above would say little about the LoRA path).
    assert outputs["attn", QUESTIONS[0]] != outputs["pi0", QUESTIONS[0]]
    assert outputs["wide", QUESTIONS[0]] != outputs["pi0", QUESTIONS[0]]


def test_mixed_arms_in_one_running_batch_change_no_row(
    engine: DecodeEngine, arms: dict[str, Path], tokenizer: Any
) -> None:
    greedy = DecodeParams(max_new_tokens=16, temperature=0)
    jobs = [(name, question) for name in arms for question in QUESTIONS]
    alone = {
        job: engine.generate(prompt_ids(tokenizer, job[1]), job[0], greedy)[0].tokens
        for job in jobs
    }
    before = engine.stats.mean_batch, engine.stats.steps, engine.stats.decode_rows
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = []
        for i, job in enumerate(jobs):
            if i % 4 == 3:
                time.sleep(0.01)  # some join a batch that is already running
            futures.append(
                pool.submit(engine.generate, prompt_ids(tokenizer, job[1]), job[0], greedy)
            )
        together = {job: f.result()[0].tokens for job, f in zip(jobs, futures, strict=True)}
    assert together == alone
    steps = engine.stats.steps - before[1]
    rows = engine.stats.decode_rows - before[2]
    assert rows / steps > 2, "the concurrent requests were not batched"


def test_logprobs_are_those_of_the_tempered_nucleus(
    engine: DecodeEngine, tiny_model: Path, arms: dict[str, Path], tokenizer: Any
) -> None:
    temperature, top_p = 0.7, 0.8
    ids = prompt_ids(tokenizer, QUESTIONS[1])
    samples = engine.generate(
        ids,
        "wide",
        DecodeParams(max_new_tokens=12, temperature=temperature, top_p=top_p, n=4, seed=5),
    )
    model = peft_model(tiny_model, arms["wide"])
    warper = TopPLogitsWarper(top_p)
    for sample in samples:
        sequence = torch.tensor([ids + sample.tokens])
        with torch.no_grad():
            logits = model(input_ids=sequence).logits[0, len(ids) - 1 : -1] / temperature
        # The definition: transformers' warper on logits / T, then log-softmax.
        expected = torch.log_softmax(warper(sequence, logits), dim=-1)
        token_logprobs = expected.gather(-1, torch.tensor(sample.tokens)[:, None])[:, 0]
        assert torch.isfinite(token_logprobs).all(), "a token outside the nucleus was drawn"
        assert sample.token_logprobs == pytest.approx(token_logprobs.tolist(), abs=1e-4)
        assert sample.logprob == pytest.approx(float(token_logprobs.sum()), abs=1e-3)
        scored = engine.score(ids, sample.tokens, "wide", temperature, top_p)
        assert scored == pytest.approx(sample.token_logprobs, abs=1e-4)


@pytest.mark.parametrize("candidates", [1024, 8])  # 8: the fallback to the whole vocabulary
def test_nucleus_matches_the_top_p_warper(candidates: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "TOP_P_CANDIDATES", candidates)
    generator = torch.Generator().manual_seed(0)
    logits = (
        torch.randn(6, 300, generator=generator) * torch.tensor([0.5, 1, 2, 4, 8, 0.1])[:, None]
    )
    top_p = torch.tensor([0.3, 0.5, 0.9, 0.95, 0.99, 1.0])
    ids, probs = engine_module._nucleus(logits, top_p)
    for row in range(6):
        warped = TopPLogitsWarper(float(top_p[row]))(
            torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1]
        )
        expected = torch.softmax(warped, dim=-1)[0]
        ours = torch.zeros(300).index_add_(0, ids[row], probs[row])
        assert torch.allclose(ours, expected, atol=1e-6), row


def test_reused_prefix_changes_nothing_and_saves_prefill(
    tiny_model: Path, arms: dict[str, Path], tokenizer: Any
) -> None:
    greedy = DecodeParams(max_new_tokens=12, temperature=0)
    results = {}
    for budget in (0, 4096):
        built = make_engine(tiny_model, {"attn": arms["attn"]}, prefix_cache_tokens=budget)
        try:
            results[budget] = [
                built.generate(prompt_ids(tokenizer, q), "attn", greedy)[0].tokens
                for q in QUESTIONS
            ]
            results[budget, "reused"] = built.stats.reused_tokens
        finally:
            built.close()
    assert results[0] == results[4096]
    assert results[0, "reused"] == 0

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b) - 1) and a[n] == b[n]:
            n += 1
        return n

    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    expected = sum(
        max(common(old, new) for old in prompts[:i]) for i, new in enumerate(prompts) if i
    )
    assert expected > 10 * (len(QUESTIONS) - 1)  # the system turn at least
    assert results[4096, "reused"] == expected


@pytest.mark.parametrize("defer_tokens", [4, 10_000])
def test_requests_arriving_together_prefill_a_shared_prompt_once(
    defer_tokens: int,
    tiny_model: Path,
    arms: dict[str, Path],
    tokenizer: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests admitted in one step that share a prompt prefix: with deferral the later ones
    wait a step and reuse it, so the prefill is what one-by-one arrival costs; without it
    (10 000) the shared part is prefilled more than once. Same greedy text either way."""
    monkeypatch.setattr(engine_module, "DEFER_TOKENS", defer_tokens)
    greedy = DecodeParams(max_new_tokens=6, temperature=0)
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS * 2]
    alone = make_engine(tiny_model, {"attn": arms["attn"]}, max_batch=16)
    try:
        expected_text = [alone.generate(ids, "attn", greedy)[0].tokens for ids in prompts]
        one_by_one = alone.stats.prefill_tokens
    finally:
        alone.close()
    built = make_engine(tiny_model, {"attn": arms["attn"]}, max_batch=16)
    try:
        with built._lock:  # the worker takes what is queued, then waits here: they arrive together
            other = built.submit([5, 6, 7], "attn", greedy)
            futures = [built.submit(ids, "attn", greedy) for ids in prompts]
        other.result(timeout=60)
        assert [f.result(timeout=60)[0].tokens for f in futures] == expected_text
        together = built.stats.prefill_tokens - 3
    finally:
        built.close()
    shared = 0
    while all(ids[shared] == prompts[0][shared] for ids in prompts):
        shared += 1
    assert shared > 10
    if defer_tokens < shared:
        assert together == one_by_one
    else:
        assert together >= one_by_one + shared


def test_seeds_reproduce_and_replacing_an_arm_takes_effect(
    engine: DecodeEngine, arms: dict[str, Path], tokenizer: Any
) -> None:
    ids = prompt_ids(tokenizer, QUESTIONS[0])
    params = DecodeParams(max_new_tokens=10, temperature=1.0, top_p=1.0, n=3, seed=11)
    first = [s.tokens for s in engine.generate(ids, "attn", params)]
    assert first == [s.tokens for s in engine.generate(ids, "attn", params)]
    assert len({tuple(t) for t in first}) > 1, "n samples of one request must differ"
    other = DecodeParams(max_new_tokens=10, temperature=1.0, top_p=1.0, n=3, seed=12)
    assert first != [s.tokens for s in engine.generate(ids, "attn", other)]

    greedy = DecodeParams(max_new_tokens=10, temperature=0)
    engine.load_arm("swap", arms["pi0"])
    as_base = engine.generate(ids, "swap", greedy)[0].tokens
    engine.load_arm("swap", arms["attn"])  # same name, new weights (a PPO update)
    assert (
        engine.generate(ids, "swap", greedy)[0].tokens
        == engine.generate(ids, "attn", greedy)[0].tokens
    )
    assert engine.generate(ids, "swap", greedy)[0].tokens != as_base
    engine.remove_arm("swap")


def test_bad_requests_fail_clearly(engine: DecodeEngine, tokenizer: Any) -> None:
    ids = prompt_ids(tokenizer, QUESTIONS[0])
    with pytest.raises(KeyError, match="no arm named 'ghost'"):
        engine.submit(ids, "ghost", DecodeParams())
    with pytest.raises(ValueError, match="exceed"):
        engine.submit(ids * 100, "pi0", DecodeParams())
    with pytest.raises(ValueError, match="temperature"):
        DecodeParams(temperature=-1)
    future = engine.submit(ids, "pi0", DecodeParams(max_new_tokens=50), deadline=time.monotonic())
    with pytest.raises(EngineTimeout):
        future.result(timeout=30)
    # The engine still serves after a timed-out request.
    assert engine.generate(ids, "pi0", DecodeParams(max_new_tokens=3, temperature=0))[0].tokens


def test_what_it_cannot_reproduce_is_refused(
    tiny_model: Path, arms: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModel, match="gpt2"):
        DecodeEngine(gpt2, end_token_ids=[0])
    config = json.loads((arms["attn"] / "adapter_config.json").read_text())
    with pytest.raises(UnsupportedModel, match="DoRA"):
        lora_scales({**config, "use_dora": True})
    with pytest.raises(UnsupportedModel, match="per-module"):
        lora_scales({**config, "rank_pattern": {"q_proj": 8}})
    assert lora_scales({**config, "use_rslora": True})["q_proj"] == pytest.approx(8 / 4**0.5)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    built = DecodeEngine(base, end_token_ids=[0])
    try:
        with pytest.raises(UnsupportedModel, match="not plain LoRA"):
            LoraArm.from_state(
                built.weights,
                {"base_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(4)},
                1.0,
            )
    finally:
        built.close()


def test_a_failing_step_fails_the_requests_it_admitted(
    tiny_model: Path, arms: dict[str, Path], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that raises after taking a request from the queue (here the forward pass) must
    fail that request's future; it used to be in neither the queue nor the running rows and
    waited forever."""
    engine = make_engine(tiny_model, arms)
    try:
        calls = {"n": 0}
        real = engine_module.forward_tokens

        def broken(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("the forward pass broke")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine_module, "forward_tokens", broken)
        future = engine.submit(prompt_ids(tokenizer, "Hello?"), "", DecodeParams(max_new_tokens=3))
        with pytest.raises(RuntimeError, match="forward pass broke"):
            future.result(timeout=30)
        # and the engine keeps serving
        again = engine.generate(prompt_ids(tokenizer, "Hello?"), "", DecodeParams(max_new_tokens=3))
        assert len(again[0].tokens) == 3 or again[0].finish_reason == "stop"
    finally:
        engine.close()


def test_stats_count_every_token_run_forward_and_every_logit_row(
    tiny_model: Path, arms: dict[str, Path], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What PPO's floor accounting reads (prefill + decode + scored tokens, logit rows) is what
    the forward passes and the vocabulary projection actually ran, counted at the source."""
    ran = {"tokens": 0, "logits": 0}
    forward = engine_module.forward_tokens

    def counting_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        ran["tokens"] += int(args[2].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine_module, "forward_tokens", counting_forward)
    built = make_engine(tiny_model, {"attn": arms["attn"], "pi0": arms["pi0"]}, max_batch=4)
    logits = built.logits

    def counting_logits(hidden: torch.Tensor) -> torch.Tensor:
        ran["logits"] += int(hidden.shape[0])
        return logits(hidden)

    built.logits = counting_logits  # type: ignore[method-assign]
    try:
        sampled = DecodeParams(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=3)
        prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS[:3]]
        futures = [built.submit(ids, "attn", sampled) for ids in prompts]
        samples = [f.result()[0] for f in futures]
        built.score(prompts[0], samples[0].tokens, "pi0", 0.8)
        built.score(prompts[1], samples[1].tokens, "pi0", 0.8)  # reuses the system turn
        stats = built.stats
        assert stats.prefill_tokens + stats.decode_rows + stats.scored_tokens == ran["tokens"]
        assert stats.logit_rows == ran["logits"]
        # And by hand: no prompt of a fresh engine is cached, each prompt is prefilled whole
        # by the time the requests run (shared parts may be reused); a reply of n tokens is
        # n - 1 decode rows; scoring runs the tokens it does not reuse, n logit rows.
        assert stats.decode_rows == sum(len(s.tokens) - 1 for s in samples)
        assert stats.prefill_tokens + stats.reused_tokens == sum(len(p) for p in prompts)
        assert stats.logit_rows == 3 + stats.decode_rows + len(samples[0].tokens) + len(
            samples[1].tokens
        )
    finally:
        built.close()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_scoring_many_at_once_gives_each_reply_its_definition(
    tiny_model: Path, arms: dict[str, Path], tokenizer: Any, temperature: float
) -> None:
    """PPO scores a batch's replies under pi_i in one pass, over the nuclei another arm sampled
    them from: each must be log softmax(logits / T) of the arm's own forward pass, restricted
    to its nucleus (peft, one sequence at a time), however the rows share prefixes."""
    built = make_engine(tiny_model, {"attn": arms["attn"], "wide": arms["wide"]}, max_batch=4)
    try:
        sampled = DecodeParams(max_new_tokens=10, temperature=0.8, top_p=0.7, seed=9, trace=True)
        prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS[:3]]
        samples = [f.result()[0] for f in [built.submit(p, "attn", sampled) for p in prompts]]
        items = [
            (p, s.tokens, s.trace.nucleus if s.trace and temperature else None)
            for p, s in zip(prompts, samples, strict=True)
        ]
        items.append((prompts[0], [], None))  # an empty reply scores nothing
        scored = built.score_many(items, "wide", temperature)
        with pytest.raises(RuntimeError, match="free rows"):
            built.score_many(items * 2, "wide", temperature)
    finally:
        built.close()
    model = peft_model(tiny_model, arms["wide"])
    assert scored[-1] == []
    for (prompt, reply, nuclei), values in zip(items[:-1], scored[:-1], strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + reply])).logits[0]
        logits = logits[len(prompt) - 1 : -1]
        expected = []
        for position, token in enumerate(reply):
            row = logits[position]
            if temperature == 0:
                expected.append(float(torch.log_softmax(row, dim=-1)[token]))
                continue
            assert nuclei is not None
            kept = nuclei[position].tolist()
            restricted = torch.log_softmax(row[kept] / temperature, dim=-1)
            expected.append(float(restricted[kept.index(token)]))
        assert values == pytest.approx(expected, abs=1e-4)


def test_scoring_many_computes_no_more_tokens_than_one_by_one(
    tiny_model: Path, arms: dict[str, Path], tokenizer: Any
) -> None:
    """States of one conversation extend each other's prompts: one by one, each reuses the
    last one's prompt from the prefix cache; at once, the longer waits for a second pass that
    reuses it, so batching never computes more (and gives the same log-probs)."""
    short = prompt_ids(tokenizer, " ".join(QUESTIONS))  # > DEFER_TOKENS past the system turn
    longer = short + prompt_ids(tokenizer, QUESTIONS[1])
    other = prompt_ids(tokenizer, QUESTIONS[2])
    items = [(short, [7, 8, 9], None), (longer, [10, 11], None), (other, [12, 13, 14], None)]
    results = {}
    for how in ("one by one", "at once"):
        built = make_engine(tiny_model, {"attn": arms["attn"]}, max_batch=4)
        try:
            # As in PPO after its first update: the system turn is in the prefix cache.
            built.score(prompt_ids(tokenizer, QUESTIONS[3]), [5], "attn", 0.8)
            if how == "at once":
                values = built.score_many(items, "attn", 0.8)
            else:
                values = [built.score(p, c, "attn", 0.8) for p, c, _ in items]
            results[how] = (values, built.stats.scored_tokens)
        finally:
            built.close()
    assert results["at once"][0] == [pytest.approx(v, abs=1e-5) for v in results["one by one"][0]]
    one_by_one = results["one by one"][1]
    assert one_by_one < sum(len(p) + len(c) - 1 for p, c, _ in items)  # it did reuse
    assert results["at once"][1] <= one_by_one
