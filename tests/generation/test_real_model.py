"""The default model for real: GGUF conversion, embedded generation, and the vLLM CPU server
serving two LoRA arms. Marked slow: CI runs them (see .ci/run)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.app import create_app
from services.db import session_scope
from services.experiments.service import ArmSpec, create_experiment
from services.generation.base import (
    AdapterMissing,
    AdapterRef,
    GenerationRequest,
    SamplingParams,
)
from services.generation.embedded import EmbeddedBackend
from services.generation.vllm import VllmBackend
from services.policies.models import PolicyStatus
from services.policies.prompt import ChatMessage
from services.policies.service import register_policy
from tests.conftest import Store, auth
from tests.factories import new_conversation, say
from tests.real_model import prepared_smollm2, vllm_available, vllm_server
from workers.learning.adapters import LoraSpec, create_zero_adapter, perturb_adapter
from workers.learning.model_prep import MARKER

pytestmark = pytest.mark.slow

PROMPT = [
    ChatMessage("system", "You write the next message of a kitchen renovation business."),
    ChatMessage("user", "Hi, do you renovate kitchens? Mine is about 12 square meters."),
]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return prepared_smollm2()


@pytest.fixture(scope="session")
def smol_adapters(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smol-adapters")
    zero = create_zero_adapter(smollm2, root / "zero", LoraSpec())
    return {"zero": zero, "noisy": perturb_adapter(zero, root / "noisy", scale=0.1, seed=3)}


@pytest.fixture(scope="session")
def smol_embedded(smollm2: Path) -> Iterator[EmbeddedBackend]:
    backend = EmbeddedBackend(smollm2, device="cpu", dtype="float32", max_context_tokens=1024)
    yield backend
    backend.close()


def test_converted_checkpoint_is_a_plain_tied_llama(smollm2: Path) -> None:
    assert (smollm2 / MARKER).is_file()
    config = (smollm2 / "config.json").read_text()
    assert "gguf" not in config.lower() and '"tie_word_embeddings": true' in config
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_embedded_zero_adapter_equals_the_base_and_arms_batch_correctly(
    smollm2: Path, smol_embedded: EmbeddedBackend, smol_adapters: dict[str, Path]
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    base = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    text = tokenizer.apply_chat_template(
        [m.as_dict() for m in PROMPT], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = base.generate(**ids, max_new_tokens=GREEDY.max_new_tokens, do_sample=False)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    zero = AdapterRef("pi0", str(smol_adapters["zero"]))
    noisy = AdapterRef("pi1", str(smol_adapters["noisy"]))
    alone = {
        ref.name: smol_embedded.generate(GenerationRequest(PROMPT, ref, GREEDY), timeout=120)
        .completions[0]
        .text
        for ref in (zero, noisy)
    }
    assert alone["pi0"] == expected
    assert len(expected.split()) >= 5, f"not a sentence: {expected!r}"
    assert alone["pi1"] != alone["pi0"]
    refs = [zero, noisy, noisy, zero]
    with ThreadPoolExecutor(4) as pool:
        texts = list(
            pool.map(
                lambda r: (
                    smol_embedded.generate(GenerationRequest(PROMPT, r, GREEDY), timeout=120)
                    .completions[0]
                    .text
                ),
                refs,
            )
        )
    assert texts == [alone[r.name] for r in refs]


@pytest.fixture(scope="session")
def vllm_url(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    problem = vllm_available()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the vLLM tests: {problem}")
        pytest.skip(f"{problem}; CI always runs this")
    with vllm_server(smollm2, tmp_path_factory.mktemp("vllm") / "vllm.log") as url:
        yield url


def test_vllm_serves_each_arm_from_its_adapter(
    vllm_url: str, smol_embedded: EmbeddedBackend, smol_adapters: dict[str, Path]
) -> None:
    backend = VllmBackend(vllm_url, max_context_tokens=1024)
    suffix = uuid.uuid4().hex[:6]
    zero = AdapterRef(f"pi0-{suffix}", str(smol_adapters["zero"]))
    noisy = AdapterRef(f"pi1-{suffix}", str(smol_adapters["noisy"]))
    served = {
        ref.name: backend.generate(GenerationRequest(PROMPT, ref, GREEDY), timeout=120)
        for ref in (zero, noisy)
    }
    assert {zero.name, noisy.name} <= set(backend.served_models())
    local = {
        ref.name: smol_embedded.generate(
            GenerationRequest(PROMPT, AdapterRef(ref.name.split("-")[0], ref.path), GREEDY),
            timeout=120,
        )
        for ref in (zero, noisy)
    }
    for name, result in served.items():
        ours = local[name].completions[0]
        theirs = result.completions[0]
        assert theirs.text == ours.text, name
        assert theirs.logprob == pytest.approx(ours.logprob, abs=0.05)
    assert served[zero.name].completions[0].text != served[noisy.name].completions[0].text
    assert backend.count_tokens(PROMPT) == smol_embedded.count_tokens(PROMPT)

    # A server that forgot an adapter (restart) gets it loaded again, transparently.
    httpx.post(f"{vllm_url}/v1/unload_lora_adapter", json={"lora_name": noisy.name})
    again = backend.generate(GenerationRequest(PROMPT, noisy, GREEDY), timeout=120)
    assert again.completions[0].text == served[noisy.name].completions[0].text
    with pytest.raises(AdapterMissing):
        backend.load_adapter(AdapterRef(f"ghost-{suffix}", "/nonexistent/adapter"))
    backend.close()


def test_api_on_vllm_suggests_from_each_arm(
    vllm_url: str, sqlite_store: Store, smollm2: Path, smol_adapters: dict[str, Path]
) -> None:
    store = sqlite_store
    business, key = store.business_key()
    suffix = uuid.uuid4().hex[:6]
    with session_scope(store.factory) as session:
        for arm in ("zero", "noisy"):
            register_policy(
                session,
                policy_id=f"{arm}-{suffix}",
                base_model=str(smollm2),
                adapter_uri=str(smol_adapters[arm]),
                status=PolicyStatus.APPROVED,
            )
        create_experiment(
            session,
            name="vllm",
            business_id=business,
            arms=[
                ArmSpec("control", f"zero-{suffix}", 1),
                ArmSpec("treatment", f"noisy-{suffix}", 1),
            ],
        )
    backend = VllmBackend(vllm_url, max_context_tokens=1024)
    settings = store.settings.model_copy(
        update={"temperature": 0.0, "max_new_tokens": 16, "generation_backend": "vllm"}
    )
    texts: dict[str, set[str]] = {"control": set(), "treatment": set()}
    with TestClient(create_app(settings, backend=backend)) as client:
        for _ in range(8):
            cid = new_conversation(client, key)
            say(client, key, cid, "customer", "Hi, do you renovate kitchens?")
            response = client.post(
                f"/v1/conversations/{cid}/suggestions", json={}, headers=auth(key)
            )
            assert response.status_code == 201, response.text
            body = response.json()
            texts[body["arm"]].add(body["text"])
    assert texts["control"] and texts["treatment"], "both arms must serve"
    assert len(texts["control"]) == len(texts["treatment"]) == 1, "greedy: one text per arm"
    assert texts["control"] != texts["treatment"]
    backend.close()


def test_fast_engine_matches_peft_per_arm_on_smollm2(
    smollm2: Path, smol_adapters: dict[str, Path]
) -> None:
    """Exactness on the real model: each arm's greedy reply equals peft + generate() in fp32,
    and a sampled reply's log-prob the trainer's forward pass (within 0.05)."""
    from peft import PeftModel

    from workers.learning.engine import DecodeEngine, DecodeParams

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    engine = DecodeEngine(
        AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32),
        end_token_ids=[tokenizer.eos_token_id],
        max_batch=4,
    )
    ids = tokenizer(
        tokenizer.apply_chat_template(
            [m.as_dict() for m in PROMPT], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    )["input_ids"]
    try:
        for name, path in smol_adapters.items():
            engine.load_arm(name, path)
            model = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32), str(path)
            ).eval()
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False)
            [greedy] = engine.generate(ids, name, DecodeParams(max_new_tokens=24, temperature=0))
            assert greedy.tokens == out[0, len(ids) :].tolist()[: len(greedy.tokens)], name
            [sample] = engine.generate(
                ids, name, DecodeParams(max_new_tokens=24, temperature=0.8, seed=1)
            )
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + sample.tokens])).logits[0]
            own = torch.log_softmax(logits[len(ids) - 1 : -1] / 0.8, dim=-1)
            expected = float(own.gather(-1, torch.tensor(sample.tokens)[:, None]).sum())
            assert abs(sample.logprob - expected) < 0.05, (name, sample.logprob, expected)
    finally:
        engine.close()
