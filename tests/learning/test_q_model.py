"""Q^pi on the tiny random Llama: it learns, it round-trips, its numbers match slow versions."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from services.policies.prompt import Turn
from tests.real_model import prepared_smollm2
from workers.learning.configs import QFitConfig
from workers.learning.examples import StepExample
from workers.learning.q_model import (
    MANIFEST,
    QFitResult,
    QHead,
    QModel,
    evaluate,
    fit_q,
    load_tokenizer,
    outcome_metrics,
    q_messages,
    render_q_inputs,
    split_by_conversation,
    subsample_examples,
    train_head,
)

# Filler words, all in the tiny tokenizer's corpus; "book" is the only signal.
WORDS = ["we", "offer", "a", "free", "quote", "ten", "year", "warranty", "blue", "sofa"]
WORDS += ["ships", "week", "thursday", "works", "see", "you", "then", "sure", "take", "time"]
CUSTOMER = ["Hi, do you renovate kitchens?", "What is the price?", "I am not sure yet."]


def keyword_examples(n_conversations: int, seed: int = 0) -> list[StepExample]:
    """Conversations of 4 decisions; those whose replies say "book" end in the outcome (G=1)."""
    rng = random.Random(seed)
    examples = []
    for c in range(n_conversations):
        booked = c % 2 == 0
        for step in range(4):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
            if booked:
                words.insert(rng.randrange(len(words) + 1), "book")
            state = tuple(
                Turn(role, rng.choice(CUSTOMER) if role == "customer" else rng.choice(WORDS))
                for role in ["customer", "business"] * step + ["customer"]
            )
            examples.append(
                StepExample(
                    conversation_id=f"c{c}",
                    step=step,
                    n_steps=4,
                    state=state,
                    action=" ".join(words),
                    ret=float(booked),
                    outcome=int(booked),
                    system="You write the next message of a kitchen business.",
                )
            )
    return examples


CONFIGS = {
    "head": dict(kind="head", head_hidden=32, head_epochs=60, head_batch_size=32, head_l2=0.01),
    "finetune": dict(kind="finetune", lora_r=8, lora_alpha=16, learning_rate=3e-3, epochs=6),
}


@pytest.fixture(scope="module", params=["head", "finetune"])
def fitted(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[QFitResult, list[StepExample]]:
    kind = request.param
    config = QFitConfig(
        base_model=str(tiny_model),
        max_length=96,
        batch_size=16,
        eval_fraction=0.25,
        seed=1,
        **CONFIGS[kind],  # type: ignore[arg-type]
    )
    examples = keyword_examples(48)
    _, held_out = split_by_conversation(examples, config.eval_fraction, config.seed)
    stages: list[str] = []
    result = fit_q(
        examples, None, config, tmp_path_factory.mktemp(f"q-{kind}"), lambda s, _: stages.append(s)
    )
    assert {"train", "evaluate"} <= set(stages)
    return result, held_out


def test_fit_learns_the_keyword(fitted: tuple[QFitResult, list[StepExample]]) -> None:
    result, held_out = fitted
    assert result.n_eval == len(held_out) == 48
    assert result.n_train == 144
    metrics = result.metrics
    assert metrics["all"]["n"] == 48 and metrics["first_half"]["n"] == 24
    assert metrics["all"]["auc"] is not None and metrics["all"]["auc"] >= 0.8, metrics
    assert metrics["first_half"]["auc"] is not None and metrics["first_half"]["auc"] >= 0.8
    # Better than always answering the base rate 0.5 (whose MSE is 0.25).
    assert metrics["all"]["mse"] is not None and metrics["all"]["mse"] < 0.15, metrics


def test_fit_changed_the_trained_parameters(
    fitted: tuple[QFitResult, list[StepExample]],
) -> None:
    result, _ = fitted
    model = result.model
    if model.head is not None:
        torch.manual_seed(model.config.seed)  # train_head draws its initial head first
        initial = QHead(model.head.feature_mean.numel(), model.config.head_hidden)
        assert not torch.allclose(model.head.out.weight, initial.out.weight)
        # And the frozen backbone stayed frozen.
        assert not any(p.requires_grad for p in model.network.parameters())
        return
    named = dict(model.network.named_parameters())
    lora_b = [p for name, p in named.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)  # initialised to zero
    trained = [p for name, p in named.items() if "modules_to_save.default" in name]
    original = [p for name, p in named.items() if "score.original_module" in name]
    assert trained and len(trained) == len(original)
    assert not torch.allclose(trained[0], original[0])


def test_save_load_score_round_trip(fitted: tuple[QFitResult, list[StepExample]]) -> None:
    result, held_out = fitted
    manifest = json.loads((result.path / MANIFEST).read_text())
    assert manifest["kind"] == result.model.kind
    assert manifest["base_model"] == result.model.config.base_model
    assert manifest["metrics"] == result.metrics
    assert QFitConfig.from_dict(manifest["config"]) == result.model.config

    loaded = QModel.load(result.path)
    items = [(e.system, e.state, e.action) for e in held_out]
    assert loaded.score(items, batch_size=8) == result.model.score(items, batch_size=8)
    # Batching pads rows differently; the scores must not depend on it beyond float noise.
    assert loaded.score(items, batch_size=3) == pytest.approx(
        loaded.score(items, batch_size=16), abs=1e-4
    )
    again = evaluate(loaded, held_out)
    assert again["all"]["auc"] == pytest.approx(result.metrics["all"]["auc"], abs=1e-6)
    assert loaded.score([]) == []


def test_fit_uses_a_given_eval_set_and_subsamples(tiny_model: Path, tmp_path: Path) -> None:
    examples = keyword_examples(20)
    config = QFitConfig(
        base_model=str(tiny_model), max_length=64, max_examples=30, head_epochs=2, seed=3
    )
    result = fit_q(examples[:60], examples[60:], config, tmp_path)
    assert (result.n_train, result.n_eval) == (30, 20)


def auc_by_pairs(scores: list[float], labels: list[int]) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    pairs = [
        (p, n)
        for (p, lp), (n, ln) in itertools.product(zip(scores, labels, strict=True), repeat=2)
        if lp == 1 and ln == 0
    ]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_outcome_metrics_match_plain_loops() -> None:
    rng = random.Random(7)
    for _ in range(20):
        n = rng.randint(2, 30)
        # Rounded scores make ties, which the AUC must count as halves.
        q = [round(rng.uniform(-0.5, 1.5), 1) for _ in range(n)]
        outcomes = [rng.randint(0, 1) for _ in range(n)]
        outcomes[0], outcomes[1] = 0, 1
        returns = [o * rng.choice([1.0, 0.9, 0.81]) for o in outcomes]
        metrics = outcome_metrics(q, returns, outcomes)
        assert metrics["n"] == n
        assert metrics["auc"] == pytest.approx(auc_by_pairs(q, outcomes))
        mse = sum((a - b) ** 2 for a, b in zip(q, returns, strict=True)) / n
        assert metrics["mse"] == pytest.approx(mse)
        brier = sum((min(max(a, 0.0), 1.0) - o) ** 2 for a, o in zip(q, outcomes, strict=True)) / n
        assert metrics["brier"] == pytest.approx(brier)
    assert outcome_metrics([0.2, 0.3], [1.0, 1.0], [1, 1])["auc"] is None
    assert outcome_metrics([], [], [])["mse"] is None


def test_subsample_takes_the_same_share_of_every_conversation() -> None:
    examples = [
        StepExample(f"c{c}", s, size, (), f"a{c}-{s}", 0.0, 0)
        for c, size in enumerate([3, 5, 8, 13, 21, 2, 9])
        for s in range(size)
    ]
    picked = subsample_examples(examples, 20, seed=5)
    assert len(picked) == 20
    assert picked == subsample_examples(examples, 20, seed=5)
    assert picked != subsample_examples(examples, 20, seed=6)
    assert picked == [e for e in examples if e in picked]  # original order
    share = 20 / len(examples)
    counts = Counter(e.conversation_id for e in picked)
    for c, size in enumerate([3, 5, 8, 13, 21, 2, 9]):
        assert abs(counts[f"c{c}"] - share * size) <= 1
    assert subsample_examples(examples, 0, seed=1) == examples


def test_split_holds_out_whole_conversations() -> None:
    examples = keyword_examples(10)
    train, held = split_by_conversation(examples, 0.3, seed=2)
    assert len(train) + len(held) == len(examples)
    assert len({e.conversation_id for e in held}) == 3
    assert not {e.conversation_id for e in train} & {e.conversation_id for e in held}
    assert split_by_conversation(examples, 0.0, seed=2) == (examples, [])


def test_render_cuts_the_state_from_the_left_and_keeps_the_reply(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    reply = "Thursday works, see you then."
    state = tuple(
        Turn("customer" if i % 2 == 0 else "business", f"message number {i} about kitchens")
        for i in range(30)
    )
    [ids] = render_q_inputs(tokenizer, [("Be brief.", state, reply)], 64)
    assert len(ids) == 64
    text = tokenizer.decode(ids)
    assert text.endswith(f"<|im_start|>assistant\n{reply}<|im_end|>\n")
    assert "message number 29" in text and "Be brief." not in text
    [short] = render_q_inputs(tokenizer, [("Be brief.", state[:1], reply)], 64)
    assert tokenizer.decode(short).startswith("<|im_start|>system\nBe brief.")


def test_the_reply_is_its_own_final_assistant_message() -> None:
    state = (Turn("customer", "Hi"), Turn("business", "Hello!"), Turn("business", "Hm?"))
    messages = q_messages(None, state, "Can I help?")
    assert [m.role for m in messages] == ["user", "assistant", "assistant"]
    assert messages[1].content == "Hello!\nHm?"
    assert messages[-1].content == "Can I help?"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", "ridge", "kind must be one of"),
        ("max_length", 8, "max_length"),
        ("lora_r", 0, "lora_r must be positive"),
        ("learning_rate", -1.0, "learning_rate must be positive"),
        ("batch_size", 0, "batch_size must be positive"),
        ("head_hidden", -1, "head_hidden must not be negative"),
        ("head_pooling", "max", "head_pooling must be one of"),
        ("eval_fraction", 1.0, "eval_fraction must be in"),
        ("max_examples", -5, "max_examples must not be negative"),
        ("dtype", "int8", "dtype must be one of"),
        ("device", "tpu", "device must be"),
        ("lora_target_modules", (), "lora_target_modules"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QFitConfig(**{field: value})  # type: ignore[arg-type]


def test_config_round_trips_and_refuses_unknown_fields() -> None:
    config = QFitConfig(kind="finetune", lora_target_modules=("q_proj",), seed=4)
    assert QFitConfig.from_dict(json.loads(json.dumps(config.as_dict()))) == config
    with pytest.raises(ValueError, match="unknown QFitConfig fields"):
        QFitConfig.from_dict({**config.as_dict(), "gamma": 0.9})
    assert all(f.metadata.get("help") for f in QFitConfig.__dataclass_fields__.values())


def test_fit_refuses_bad_input(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="base_model"):
        fit_q(keyword_examples(2), None, QFitConfig(), tmp_path)
    with pytest.raises(ValueError, match="no training examples"):
        fit_q([], None, QFitConfig(base_model=str(tiny_model)), tmp_path)
    with pytest.raises(FileNotFoundError, match=MANIFEST):
        QModel.load(tmp_path)


def test_train_head_weighs_examples() -> None:
    """Two identical inputs with targets 0 and 1: the fit lands at their weighted mean."""
    features = torch.zeros(2, 3)
    config = QFitConfig(head_epochs=200, head_learning_rate=1e-2, head_l2=0.0)
    head = train_head(features, torch.tensor([0.0, 1.0]), torch.tensor([3.0, 1.0]), config)
    with torch.no_grad():
        assert float(head(features[:1])) == pytest.approx(0.25, abs=1e-3)


@pytest.mark.slow
def test_real_model_head_and_finetune(tmp_path: Path) -> None:
    """SmolLM2-135M: the head learns the keyword; a few LoRA steps save and reload exactly."""
    base = str(prepared_smollm2())
    examples = keyword_examples(48, seed=3)
    head = fit_q(
        examples,
        None,
        QFitConfig(base_model=base, max_length=96, eval_fraction=0.25, head_l2=0.01),
        tmp_path / "head",
    )
    assert head.metrics["all"]["auc"] is not None and head.metrics["all"]["auc"] >= 0.8
    config = QFitConfig(kind="finetune", base_model=base, max_length=96, lora_r=4, lora_alpha=8)
    finetune = fit_q(examples[:48], examples[48:56], config, tmp_path / "ft")
    assert finetune.metrics["all"]["n"] == 8
    items = [(e.system, e.state, e.action) for e in examples[48:56]]
    assert QModel.load(finetune.path).score(items) == finetune.model.score(items)
