"""Q^pi on the tiny random Llama: it learns, it round-trips, its numbers match slow versions."""

from __future__ import annotations

import copy
import itertools
import json
import random
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from services.policies.prompt import Turn
from tests.real_model import prepared_smollm2
from workers.learning.configs import QFitConfig
from workers.learning.examples import StepExample
from workers.learning.held_out import outcome_metrics
from workers.learning.q_model import (
    MANIFEST,
    STATE,
    QFitResult,
    QHead,
    QModel,
    _frozen_backbone,
    evaluate,
    fit_q,
    fit_ridge_head,
    load_tokenizer,
    pooled_features,
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
    "ridge": dict(kind="head", head_pooling="state_reply"),  # linear: closed form
    "finetune": dict(kind="finetune", lora_r=8, lora_alpha=16, learning_rate=3e-3, epochs=6),
}


@pytest.fixture(scope="module", params=["head", "ridge", "finetune"])
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
        eval_bootstrap=300,
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
    # Every number has its conversation-clustered interval around it.
    for group in ("all", "first_half"):
        values = metrics[group]  # type: ignore[literal-required]
        for name in ("auc", "mse", "brier"):
            assert values[f"{name}_lo"] <= values[name] <= values[f"{name}_hi"], (group, name)
    # The keyword is in the reply only: Q - V ranks the held-out returns.
    rank = metrics["rank"]
    assert rank["n"] == 48 and rank["corr_lo"] is not None and rank["corr_lo"] > 0.3, rank
    assert result.fit["v_alpha"] in result.model.config.head_alphas
    if result.model.kind == "head" and result.model.config.head_hidden == 0:
        assert result.fit["head_alpha"] in result.model.config.head_alphas
    else:
        assert result.fit["head_alpha"] is None


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
    assert manifest["fit"] == result.fit
    assert QFitConfig.from_dict(manifest["config"]) == result.model.config

    loaded = QModel.load(result.path)
    assert loaded.config.reply_budget == 48  # max_length 96: at most half, 64 asked
    items = [(e.system, e.state, e.action) for e in held_out]
    assert loaded.score(items, batch_size=8) == result.model.score(items, batch_size=8)
    # Batching pads rows differently; the scores must not depend on it beyond float noise.
    assert loaded.score(items, batch_size=3) == pytest.approx(
        loaded.score(items, batch_size=16), abs=1e-4
    )
    again = evaluate(loaded, held_out)
    assert again["all"]["auc"] == pytest.approx(result.metrics["all"]["auc"], abs=1e-6)
    assert loaded.score([]) == []
    if loaded.head is not None:  # V reads the same frozen backbone: the whole report again
        config = loaded.config
        full = evaluate(
            loaded, held_out, value=result.value, n_boot=config.eval_bootstrap, seed=config.seed
        )
        assert full["rank"] == pytest.approx(result.metrics["rank"], abs=1e-6)
        assert full["first_half"] == pytest.approx(result.metrics["first_half"], abs=1e-6)


def test_fit_uses_a_given_eval_set_and_subsamples(tiny_model: Path, tmp_path: Path) -> None:
    examples = keyword_examples(20)
    config = QFitConfig(
        kind="head",
        base_model=str(tiny_model),
        max_length=64,
        max_examples=30,
        head_epochs=2,
        seed=3,
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
    [(ids, start)] = render_q_inputs(tokenizer, [("Be brief.", state, reply)], 64)
    assert len(ids) == 64
    text = tokenizer.decode(ids)
    assert text.endswith(f"<|im_start|>assistant\n{reply}<|im_end|>\n")
    assert "message number 29" in text and "Be brief." not in text
    # The reply span: the reply's own tokens and the template's closing ones.
    assert tokenizer.decode(ids[start:]) == f"{reply}<|im_end|>\n"
    assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    [(short, short_start)] = render_q_inputs(tokenizer, [("Be brief.", state[:1], reply)], 64)
    assert tokenizer.decode(short).startswith("<|im_start|>system\nBe brief.")
    assert tokenizer.decode(short[short_start:]) == f"{reply}<|im_end|>\n"
    # No prompt at all, and a reply longer than max_length: the cut reaches into the reply.
    [(alone, alone_start)] = render_q_inputs(tokenizer, [(None, (), reply)], 64)
    assert tokenizer.decode(alone[alone_start:]) == f"{reply}<|im_end|>\n"
    long_reply = " ".join(["thursday works"] * 40)
    [(cut, cut_start)] = render_q_inputs(tokenizer, [("Be brief.", state, long_reply)], 32)
    assert len(cut) == 32 and cut_start == 0


def test_with_a_reply_budget_the_state_tokens_do_not_depend_on_the_reply(
    tiny_model: Path,
) -> None:
    """Cut as a whole, a longer reply leaves less state, and the state's hidden states (V's
    features) then tell the reply's length; with a reply budget they are the reply's own."""
    tokenizer = load_tokenizer(tiny_model)
    state = tuple(
        Turn("customer" if i % 2 == 0 else "business", f"message number {i} about kitchens")
        for i in range(30)
    )
    short, long = "Sure.", " ".join(["thursday works"] * 40)
    items = [("Be brief.", state, short), ("Be brief.", state, long)]
    (ids_short, start_short), (ids_long, start_long) = render_q_inputs(tokenizer, items, 96, 24)
    assert ids_short[:start_short] == ids_long[:start_long] and start_short == 96 - 24
    assert tokenizer.decode(ids_short[start_short:]) == f"{short}<|im_end|>\n"
    assert len(ids_long) == 96 and tokenizer.decode(ids_long[start_long:]).startswith(long[:30])
    whole = render_q_inputs(tokenizer, items, 96)
    assert whole[0].ids[: whole[0].reply_start] != whole[1].ids[: whole[1].reply_start]

    backbone = _frozen_backbone(QFitConfig(base_model=str(tiny_model)), torch.device("cpu"))
    pad_id = int(tokenizer.pad_token_id)
    for inputs, same in ((render_q_inputs(tokenizer, items, 96, 24), True), (whole, False)):
        states = pooled_features(backbone, inputs, poolings=[STATE], batch_size=2, pad_id=pad_id)
        assert torch.allclose(states[STATE][0], states[STATE][1], atol=1e-5) is same


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
        ("head_alphas", (), "head_alphas must be positive"),
        ("head_alphas", (1.0, 0.0), "head_alphas must be positive"),
        ("head_cv_folds", 1, "head_cv_folds must be at least 2"),
        ("eval_bootstrap", -1, "eval_bootstrap must not be negative"),
        ("max_reply_length", -1, "max_reply_length must not be negative"),
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


def test_a_manifest_from_before_the_reply_budget_loads_with_the_whole_text_cut(
    fitted: tuple[QFitResult, list[StepExample]], tmp_path: Path
) -> None:
    result, _ = fitted
    shutil.copytree(result.path, tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / MANIFEST).read_text())
    del manifest["config"]["max_reply_length"], manifest["config"]["head_alphas"]
    del manifest["fit"]
    (tmp_path / "old" / MANIFEST).write_text(json.dumps(manifest))
    old = QModel.load(tmp_path / "old")
    assert old.config.max_reply_length == 0 and old.config.reply_budget == 0 and old.fit == {}


def test_fit_refuses_bad_input(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="base_model"):
        fit_q(keyword_examples(2), None, QFitConfig(kind="head"), tmp_path)
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


def ridge_objective(
    head: QHead, features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, alpha: float
) -> float:
    """sum_i w_i (y_i - Q_i)^2 + alpha |W|^2, weights scaled to mean 1 (the head's units)."""
    w = weights / weights.mean()
    with torch.no_grad():
        residual = head(features) - targets
        return float((w * residual**2).sum() + alpha * head.out.weight.square().sum())


def test_linear_head_is_sklearns_closed_form_ridge() -> None:
    from sklearn.linear_model import Ridge

    generator = torch.Generator().manual_seed(0)
    # Features like a backbone's: a few dimensions far larger than the rest.
    scale = torch.ones(24)
    scale[:3] = 300.0
    features = torch.randn(120, 24, generator=generator) * scale + 5.0
    targets = (features[:, 5] > 5.0).float() + 0.3 * torch.randn(120, generator=generator)
    weights = torch.rand(120, generator=generator) * 2.0 + 0.1
    groups = [f"c{i // 4}" for i in range(120)]
    config = QFitConfig(head_alphas=(0.1, 1.0, 10.0, 100.0, 1000.0))
    head, alpha = fit_ridge_head(features, targets.tolist(), weights.tolist(), groups, config)
    assert alpha in config.head_alphas

    standardised = (features.double() - head.feature_mean.double()) / head.feature_std.double()
    reference = Ridge(alpha=alpha).fit(
        standardised.numpy(), targets.double().numpy(), sample_weight=(weights / weights.mean())
    )
    with torch.no_grad():
        predicted = head(features).double().numpy()
    assert predicted == pytest.approx(reference.predict(standardised.numpy()), abs=1e-5)

    # Adam on the same objective (head_l2 is its per-example penalty) does not get lower.
    adam = train_head(
        features, targets, weights, replace(config, head_l2=alpha / len(features), head_epochs=30)
    )
    closed = ridge_objective(head, features, targets, weights, alpha)
    assert closed <= ridge_objective(adam, features, targets, weights, alpha) + 1e-6


def test_pooled_features_are_the_spans_own_means(tiny_model: Path) -> None:
    """'state_reply' = [mean over the state's tokens, mean over the reply's], 'mean' over all,
    STATE the same as running the backbone on the state alone (causal attention)."""
    config = QFitConfig(base_model=str(tiny_model))
    tokenizer = load_tokenizer(tiny_model)
    backbone = _frozen_backbone(config, torch.device("cpu"))
    items = [(e.system, e.state, e.action) for e in keyword_examples(3)[:7]]
    inputs = render_q_inputs(tokenizer, items, 80)
    pooled = pooled_features(
        backbone,
        inputs,
        poolings=["state_reply", "mean", STATE],
        batch_size=3,
        pad_id=int(tokenizer.pad_token_id),
    )
    for row, (ids, start) in enumerate(inputs):
        with torch.no_grad():
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
            alone = backbone(input_ids=torch.tensor([ids[:start]])).last_hidden_state[0]
        expected = torch.cat([hidden[:start].mean(0), hidden[start:].mean(0)])
        assert torch.allclose(pooled["state_reply"][row], expected, atol=1e-5)
        assert torch.allclose(pooled["mean"][row], hidden.mean(0), atol=1e-5)
        assert torch.allclose(pooled[STATE][row], alone.mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="unknown poolings"):
        pooled_features(backbone, inputs, poolings=["max"], batch_size=3, pad_id=0)


@pytest.mark.parametrize("fitted", ["ridge"], indirect=True)
def test_a_q_blind_to_the_reply_does_not_rank(
    fitted: tuple[QFitResult, list[StepExample]],
) -> None:
    """The state_reply ridge Q with its reply half zeroed ranks nothing; whole, it does."""
    result, held_out = fitted
    model = result.model
    assert model.config.head_pooling == "state_reply" and model.head is not None
    blind_head = copy.deepcopy(model.head)
    with torch.no_grad():
        n_state = blind_head.out.weight.shape[1] // 2
        blind_head.out.weight[:, n_state:] = 0.0
    blind = QModel(
        config=model.config, tokenizer=model.tokenizer, network=model.network, head=blind_head
    )
    config = model.config
    rank = evaluate(
        blind, held_out, value=result.value, n_boot=config.eval_bootstrap, seed=config.seed
    )["rank"]
    assert rank["corr_lo"] is not None and rank["corr_hi"] is not None
    assert rank["corr_lo"] < 0.0 < rank["corr_hi"], rank
    assert result.metrics["rank"]["corr_lo"] > 0.3  # the same Q with the reply ranks


@pytest.mark.slow
def test_real_model_head_and_finetune(tmp_path: Path) -> None:
    """SmolLM2-135M: the head learns the keyword; a few LoRA steps save and reload exactly."""
    base = str(prepared_smollm2())
    examples = keyword_examples(48, seed=3)
    head = fit_q(
        examples,
        None,
        QFitConfig(kind="head", base_model=base, max_length=96, eval_fraction=0.25, head_l2=0.01),
        tmp_path / "head",
    )
    assert head.metrics["all"]["auc"] is not None and head.metrics["all"]["auc"] >= 0.8
    config = QFitConfig(kind="finetune", base_model=base, max_length=96, lora_r=4, lora_alpha=8)
    finetune = fit_q(examples[:48], examples[48:56], config, tmp_path / "ft")
    assert finetune.metrics["all"]["n"] == 8
    items = [(e.system, e.state, e.action) for e in examples[48:56]]
    assert QModel.load(finetune.path).score(items) == finetune.model.score(items)
