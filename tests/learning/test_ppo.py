"""Our token-level PPO: the tensor helpers against loops and hand computations, a learning run
on the tiny random model, the reference being pi_i, and a bounded smoke run on SmolLM2."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.policies.prompt import ChatMessage
from tests.tiny_model import CORPUS
from workers.learning.configs import PPOConfig, RLOOConfig
from workers.learning.improve import HISTORY_FILE, improve_policy
from workers.learning.policy_model import load_policy, load_tokenizer
from workers.learning.ppo import (
    PROBE_PROMPT_TOKENS,
    REFERENCE_ADAPTER,
    LogprobMismatch,
    ValueHead,
    check_rollout_logprobs,
    check_served_logprobs,
    compute_gae,
    entropy_of,
    logprobs_of,
    masked_mean,
    masked_var,
    masked_whiten,
    nucleus_mask,
    pack_rows,
    policy_loss,
    reply_forward,
    reply_token_mask,
    rollout_engine,
    rollout_rows,
    sample_from_engine,
    sample_replies,
    score_rollout,
    sync_policy,
    token_rewards,
    value_loss,
)
from workers.learning.tree_attention import enable_tree_attention, uses_tree_attention

# -- the toy problem shared with test_rl_trl.py ----------------------------------------------

# The tiny model ties its embeddings (std 0.02) and ends in an RMSNorm, so its logits stay
# within about +-1.3 whatever LoRA does: at temperature 1 every policy is nearly uniform and
# nothing can be learned. At temperature 0.2 the same weights span a real range. The reward
# counts newlines, a token this random model already drifts into (a frequent-token reward):
# about 2% of reply tokens before training, so the signal is there but far from saturated.
TOY_TEMPERATURE = 0.2
TOY_NEW_TOKENS = 8


def newline_reward(prompts: Sequence[list[ChatMessage]], replies: Sequence[str]) -> list[float]:
    """Fraction of the reply budget spent on newlines."""
    return [reply.count("\n") / TOY_NEW_TOKENS for reply in replies]


# PPO on the toy problem: newlines go from 0.06 to 0.46 of the reply (see the learning test).
TOY_PPO = PPOConfig(
    num_updates=20,
    batch_size=64,
    minibatch_size=16,
    n_ppo_epochs=2,
    learning_rate=3e-3,
    beta=0.01,
    max_new_tokens=TOY_NEW_TOKENS,
    temperature=TOY_TEMPERATURE,
    device="cpu",
    seed=0,
)


def _prompt(text: str) -> list[ChatMessage]:
    return [ChatMessage("system", "You write the next message of acme."), ChatMessage("user", text)]


_WORDS = " ".join(CORPUS).split()
TRAIN_PROMPTS = [_prompt(" ".join(_WORDS[i : i + 6])) for i in range(0, 60, 3)]
HELD_OUT_PROMPTS = [
    _prompt(text)
    for text in (
        "Do you deliver sofas on weekends?",
        "How long does a bathroom renovation take?",
        "Is the warranty transferable to a new owner?",
        "Can I pay in three instalments?",
        "My order arrived damaged, what now?",
        "Are you open on public holidays?",
        "Could you send me a brochure by email?",
        "Which colours does the armchair come in?",
    )
]


def mean_reward(base_model: Path, adapter: Path, *, rounds: int = 8, seed: int = 1234) -> float:
    """The toy reward of replies sampled from base + adapter (loaded with plain peft) on the
    held-out prompts, with a fixed seed."""
    tokenizer = AutoTokenizer.from_pretrained(str(base_model), padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    torch.manual_seed(seed)
    scores: list[float] = []
    for _ in range(rounds):
        rollout = sample_replies(
            model,
            tokenizer,
            HELD_OUT_PROMPTS,
            max_new_tokens=TOY_NEW_TOKENS,
            temperature=TOY_TEMPERATURE,
            top_p=1.0,
        )
        scores.extend(newline_reward(HELD_OUT_PROMPTS, rollout.texts))
    return sum(scores) / len(scores)


def lora_weights(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter / "adapter_model.safetensors"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread. On a 2-core machine that other jobs keep busy, a second intra-op
    thread made generation far slower, not faster (measured: tiny model 0.8 s vs 0.07 s per
    call; SmolLM2, 2 x 16 new tokens, 116 s vs 1.9 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- tensor helpers ---------------------------------------------------------------------------


def gae_by_loop(
    rewards: list[float], values: list[float], length: int, gamma: float, lam: float
) -> list[float]:
    """A_t = sum_{k>=t} (gamma*lam)^(k-t) delta_k over the first `length` tokens, V after = 0."""
    deltas = []
    for k in range(length):
        next_value = values[k + 1] if k + 1 < length else 0.0
        deltas.append(rewards[k] + gamma * next_value - values[k])
    return [
        sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, length)) for t in range(length)
    ]


@pytest.mark.parametrize("seed", range(6))
def test_compute_gae_matches_a_python_loop(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    batch, steps = 6, 9
    rewards = torch.randn(batch, steps, generator=generator)
    values = torch.randn(batch, steps, generator=generator)
    lengths = torch.randint(0, steps + 1, (batch,), generator=generator).tolist()
    lengths[0], lengths[1] = steps, 1  # always cover a full row and a one-token row
    mask = (torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]).float()
    gamma, lam = (0.5 + 0.5 * float(x) for x in torch.rand(2, generator=generator))

    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)

    for row, length in enumerate(lengths):
        expected = gae_by_loop(rewards[row].tolist(), values[row].tolist(), length, gamma, lam)
        assert advantages[row, :length].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
        expected_returns = [
            a + v for a, v in zip(expected, values[row, :length].tolist(), strict=True)
        ]
        assert returns[row, :length].tolist() == pytest.approx(expected_returns, rel=1e-5, abs=1e-5)
        assert advantages[row, length:].abs().sum() == 0
        assert returns[row, length:].abs().sum() == 0


def test_compute_gae_by_hand_on_three_tokens() -> None:
    # Q = 1 at the last token, gamma 0.9, lam 0.8:
    # delta = [0.9*0.6 - 0.5, 0.9*0.7 - 0.6, 1 - 0.7] = [0.04, 0.03, 0.3]
    # A_2 = 0.3; A_1 = 0.03 + 0.72*0.3 = 0.246; A_0 = 0.04 + 0.72*0.246 = 0.21712
    # A fourth, padded token with absurd numbers must change nothing.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert advantages[0].tolist() == pytest.approx([0.21712, 0.246, 0.3, 0.0])
    assert returns[0].tolist() == pytest.approx([0.71712, 0.846, 1.0, 0.0])


def test_default_gae_gives_the_first_token_the_whole_terminal_reward() -> None:
    # Q arrives once, at the last of 64 tokens, and the value head starts at zero: with lam < 1
    # the first token would see lam^63 of it (0.95^63 = 0.04), and learn nothing.
    config = PPOConfig()
    rewards = torch.zeros(1, 64)
    rewards[0, -1] = 0.8
    zeros, mask = torch.zeros(1, 64), torch.ones(1, 64)
    advantages, _ = compute_gae(rewards, zeros, mask, config.gamma_tok, config.lam)
    assert advantages[0].tolist() == pytest.approx([0.8] * 64)


def test_policy_loss_by_hand_with_a_clipped_token() -> None:
    # Token 1: ratio e^0.5 = 1.6487 with A = +1 is clipped to 1.2: loss term -1.2.
    # Token 2: ratio e^-0.1 = 0.9048 with A = -2 is inside the range: 2 * 0.9048 = 1.8097.
    # Token 3 is masked out, with values that would dominate otherwise.
    logprobs = torch.tensor([[-1.0, -2.1, 5.0]])
    old_logprobs = torch.tensor([[-1.5, -2.0, -5.0]])
    advantages = torch.tensor([[1.0, -2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    ratio_1, ratio_2 = math.exp(0.5), math.exp(-0.1)
    assert loss.item() == pytest.approx((-1.2 + 2 * ratio_2) / 2, rel=1e-5)
    assert clipfrac.item() == pytest.approx(0.5)
    k3 = ((ratio_1 - 1 - 0.5) + (ratio_2 - 1 + 0.1)) / 2
    assert approx_kl.item() == pytest.approx(k3, rel=1e-5)


def test_policy_loss_gradient_only_flows_through_unclipped_tokens() -> None:
    logprobs = torch.tensor([[-1.0, -2.1]], requires_grad=True)
    loss, _, _ = policy_loss(
        logprobs, torch.tensor([[-1.5, -2.0]]), torch.tensor([[1.0, -2.0]]), torch.ones(1, 2), 0.2
    )
    torch.autograd.backward(loss)
    assert logprobs.grad is not None
    # d/dlogp of -A * ratio / 2 tokens: clipped token 0 gets none, token 1 gets 2*ratio/2.
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, math.exp(-0.1)], rel=1e-5)


def test_value_loss_by_hand_with_a_clipped_token() -> None:
    # Token 1: V 0.9 moved from 0.5, return 1.0: unclipped (0.1)^2 = 0.01, clipped V 0.7 gives
    # (0.3)^2 = 0.09, the max is the clipped one.
    # Token 2: V 1.0 from 0.95, return 0.0: inside the clip range, both give 1.0.
    values = torch.tensor([[0.9, 1.0, 7.0]])
    old_values = torch.tensor([[0.5, 0.95, 0.0]])
    returns = torch.tensor([[1.0, 0.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = value_loss(values, old_values, returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.09 + 1.0) / 2, rel=1e-5)
    assert clipfrac.item() == pytest.approx(0.5)


def test_masked_whiten_statistics_ignore_masked_entries() -> None:
    generator = torch.Generator().manual_seed(0)
    values = 3.0 + 2.0 * torch.randn(4, 10, generator=generator)
    mask = (torch.rand(4, 10, generator=generator) > 0.3).float()
    whitened = masked_whiten(values, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, rel=1e-4)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(values, mask).item())
    # Garbage where mask is 0 must not move the whitened values where it is 1.
    noisy = values + 1000.0 * (1 - mask)
    assert torch.allclose(masked_whiten(noisy, mask) * mask, whitened * mask, atol=1e-5)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx(
        [
            sum(v * m for v, m in zip(row, keep, strict=True)) / sum(keep)
            for row, keep in zip(values.tolist(), mask.tolist(), strict=True)
        ],
        rel=1e-5,
    )


def nucleus_by_loop(probs: list[float], top_p: float) -> set[int]:
    """The most likely tokens, in order, while the mass taken so far is below top_p."""
    kept: set[int] = set()
    mass = 0.0
    for token in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if kept and mass >= top_p:
            break
        kept.add(token)
        mass += probs[token]
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.95])
def test_nucleus_mask_matches_a_python_loop_and_the_sampler(top_p: float) -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    generator = torch.Generator().manual_seed(int(top_p * 100))
    logits = 2.0 * torch.randn(3, 4, 11, generator=generator)
    nucleus = nucleus_mask(logits, top_p)
    assert nucleus.shape == logits.shape and nucleus.dtype == torch.bool
    for row, (dist_logits, dist_nucleus) in enumerate(
        zip(logits.view(-1, 11), nucleus.view(-1, 11), strict=True)
    ):
        expected = nucleus_by_loop(torch.softmax(dist_logits, -1).tolist(), top_p)
        assert set(torch.nonzero(dist_nucleus).flatten().tolist()) == expected, row
    sampler_keeps = TopPLogitsWarper(top_p)(None, logits.view(-1, 11)) > -float("inf")  # type: ignore[arg-type]
    assert torch.equal(nucleus.view(-1, 11), sampler_keeps)
    assert nucleus_mask(logits, 1.0).all()


def test_logprobs_and_entropy_over_a_nucleus_match_a_python_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=generator)
    tokens = torch.randint(0, 7, (2, 3), generator=generator)
    nucleus = torch.rand(2, 3, 7, generator=generator) > 0.5
    nucleus.scatter_(-1, tokens.unsqueeze(-1), True)  # the token is always in its nucleus
    logprobs = logprobs_of(logits, tokens, nucleus)
    entropy = entropy_of(logits, nucleus)
    for b in range(2):
        for t in range(3):
            kept = [v for v, keep in enumerate(nucleus[b, t].tolist()) if keep]
            weights = {v: math.exp(logits[b, t, v].item()) for v in kept}
            total = sum(weights.values())
            probs = {v: w / total for v, w in weights.items()}
            token = int(tokens[b, t])
            assert logprobs[b, t].item() == pytest.approx(math.log(probs[token]), abs=1e-5)
            expected_entropy = -sum(p * math.log(p) for p in probs.values())
            assert entropy[b, t].item() == pytest.approx(expected_entropy, abs=1e-5)
    assert torch.equal(logprobs_of(logits, tokens), logprobs_of(logits, tokens, None))
    full = torch.ones_like(nucleus)
    assert torch.allclose(logprobs_of(logits, tokens, full), logprobs_of(logits, tokens))
    assert torch.allclose(entropy_of(logits, full), entropy_of(logits), atol=1e-6)


def test_reply_token_mask_by_hand() -> None:
    # End tokens 2 and 9. Row 0 ends at its third token and generate() pads after it; row 1 is
    # cut at the length limit; row 2 ends at once; row 3 ends on the last allowed token.
    replies = torch.tensor(
        [
            [5, 6, 2, 0, 0],
            [5, 6, 7, 8, 5],
            [9, 0, 0, 0, 0],
            [5, 6, 7, 8, 9],
        ]
    )
    assert reply_token_mask(replies, [2, 9]).tolist() == [
        [1.0, 1.0, 1.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 1.0],
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 1.0],
    ]
    # A second end token after the first changes nothing.
    assert reply_token_mask(torch.tensor([[5, 2, 9, 2]]), [2, 9]).tolist() == [[1, 1, 0, 0]]


def test_token_rewards_put_the_score_on_the_last_reply_token_only() -> None:
    mask = torch.tensor(
        [
            [1.0, 1.0, 1.0, 0.0, 0.0],  # ended at its end token, index 2
            [1.0, 1.0, 1.0, 1.0, 1.0],  # cut at max_new_tokens: the last generated token
            [1.0, 0.0, 0.0, 0.0, 0.0],  # the end token came first
        ]
    )
    kl = torch.tensor(
        [
            [0.1, -0.2, 0.3, 50.0, 50.0],  # values past the end must not count
            [0.0, 0.1, 0.0, 0.2, 0.4],
            [0.5, 9.0, 9.0, 9.0, 9.0],
        ]
    )
    score = torch.tensor([2.0, -1.0, 0.5])
    rewards = token_rewards(score, kl, mask, beta=0.1)
    expected = [
        [-0.01, 0.02, -0.03 + 2.0, 0.0, 0.0],
        [0.0, -0.01, 0.0, -0.02, -0.04 - 1.0],
        [-0.05 + 0.5, 0.0, 0.0, 0.0, 0.0],
    ]
    for row, want in zip(rewards.tolist(), expected, strict=True):
        assert row == pytest.approx(want, abs=1e-6)


# -- configuration and entry point ----------------------------------------------------------


def test_configs_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="minibatch_size"):
        PPOConfig(batch_size=4, minibatch_size=8)
    with pytest.raises(ValueError, match="cliprange"):
        PPOConfig(cliprange=0.0)
    with pytest.raises(ValueError, match="lam"):
        PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="device"):
        PPOConfig(device="tpu")
    with pytest.raises(ValueError, match="top_p"):
        PPOConfig(top_p=0.0)
    config = PPOConfig(target_kl=0.05)
    assert PPOConfig(**config.as_dict()) == config


def test_improve_policy_refuses_mismatches(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    def improve(
        config: PPOConfig | RLOOConfig, output_dir: Path, prompts: list[list[ChatMessage]]
    ) -> None:
        improve_policy(
            algorithm="ppo",
            base_model=tiny_model,
            parent_adapter=tiny_adapters["zero"],
            prompts=prompts,
            reward_fn=newline_reward,
            config=config,
            output_dir=output_dir,
        )

    with pytest.raises(ValueError, match="PPOConfig"):
        improve(RLOOConfig(), tmp_path / "a", TRAIN_PROMPTS)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "adapter_config.json").write_text("{}")
    with pytest.raises(FileExistsError):
        improve(PPOConfig(), occupied, TRAIN_PROMPTS)
    with pytest.raises(ValueError, match="no prompts"):
        improve(PPOConfig(), tmp_path / "b", [])
    with pytest.raises(FileNotFoundError):
        improve_policy(
            algorithm="ppo",
            base_model=tiny_model,
            parent_adapter=tmp_path / "missing",
            prompts=TRAIN_PROMPTS,
            reward_fn=newline_reward,
            config=PPOConfig(),
            output_dir=tmp_path / "c",
        )


# -- training on the tiny model ---------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_ppo_learns_the_toy_reward(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    parent = tiny_adapters["zero"]
    reported: list[tuple[str, float]] = []
    config = TOY_PPO
    result = improve_policy(
        algorithm="ppo",
        base_model=tiny_model,
        parent_adapter=parent,
        prompts=TRAIN_PROMPTS,
        reward_fn=newline_reward,
        config=config,
        output_dir=tmp_path / "pi1",
        progress=lambda stage, fraction: reported.append((stage, fraction)),
    )

    before = mean_reward(tiny_model, parent)
    after = mean_reward(tiny_model, result.adapter_dir)
    # Measured (lam = 1): 0.06 -> 0.46 with seed 0; seeds 1-4 reached 0.38 to 0.46.
    assert after > before + 0.1, (before, after)

    # One adapter with the parent's shape, different weights, nothing else saved with it.
    old, new = lora_weights(parent), lora_weights(result.adapter_dir)
    assert new.keys() == old.keys()
    assert all(new[k].shape == old[k].shape for k in old)
    assert any(not torch.equal(new[k], old[k]) for k in old if "lora_B" in k)
    assert sorted(p.name for p in result.adapter_dir.iterdir() if p.is_dir()) == []
    assert not (tmp_path / "pi1.part").exists()
    record = json.loads((result.adapter_dir / HISTORY_FILE).read_text())
    assert record["config"]["num_updates"] == 20

    assert len(result.history) == 20
    for metrics in result.history:
        for key in ("q_mean", "reward_mean", "kl_ref", "clipfrac", "entropy", "value_loss"):
            assert math.isfinite(metrics[key]), (key, metrics)
    assert result.history[-1]["kl_ref"] > 0  # the policy moved away from pi_i, and we see it
    assert result.metrics["q_mean_first"] == result.history[0]["q_mean"]
    assert reported[-1] == ("done", 1.0)
    assert [f for s, f in reported if s == "ppo"] == pytest.approx(
        [(i + 1) / 20 for i in range(20)]
    )


@pytest.mark.usefixtures("one_thread")
def test_the_kl_reference_is_the_parent_policy_not_the_base(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    noisy = tiny_adapters["noisy"]
    # The noisy parent is far from the base model on the replies it samples ...
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model), padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(noisy))
    model.eval()
    torch.manual_seed(0)
    rollout = sample_replies(
        model, tokenizer, TRAIN_PROMPTS[:8], max_new_tokens=8, temperature=1.0, top_p=1.0
    )
    packed = pack_rows(rollout_rows(rollout, range(8)), rollout.reply_mask.shape[1])
    with torch.no_grad():
        parent_logprobs, _, _ = reply_forward(model, packed, 1.0)
        with model.disable_adapter():
            base_logprobs, _, _ = reply_forward(model, packed, 1.0)
    gap = masked_mean((parent_logprobs - base_logprobs).abs(), rollout.reply_mask).item()
    assert gap > 0.1

    # ... so a KL of zero at the first rollout (policy == pi_i) shows the reference is pi_i.
    def letters(states: Sequence[list[ChatMessage]], replies: Sequence[str]) -> list[float]:
        return [sum(c.isalpha() for c in reply) / max(len(reply), 1) for reply in replies]

    result = improve_policy(
        algorithm="ppo",
        base_model=tiny_model,
        parent_adapter=noisy,
        prompts=TRAIN_PROMPTS,
        reward_fn=letters,  # dense, so that the first update surely moves the policy
        config=PPOConfig(num_updates=2, batch_size=8, max_new_tokens=8, beta=0.1, device="cpu"),
        output_dir=tmp_path / "pi1",
    )
    assert abs(result.history[0]["kl_ref"]) < 1e-4
    assert abs(result.history[1]["kl_ref"]) > 1e-4  # after one update it is not zero any more


# -- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_ppo_smoke_on_smollm2(tmp_path: Path) -> None:
    from tests.real_model import prepared_smollm2
    from workers.learning.adapters import LoraSpec, create_zero_adapter

    smollm2 = prepared_smollm2()
    pi0 = create_zero_adapter(smollm2, tmp_path / "pi0", LoraSpec())
    prompts = [
        [
            ChatMessage("system", "You write the next message of a kitchen renovation business."),
            ChatMessage("user", "Hi, do you renovate kitchens? Mine is about 12 square meters."),
        ],
        [
            ChatMessage("system", "You write the next message of a furniture shop."),
            ChatMessage("user", "Is the blue sofa still available?"),
        ],
    ]

    def shortness(states: Sequence[list[ChatMessage]], replies: Sequence[str]) -> list[float]:
        return [1.0 - min(len(reply), 200) / 200 for reply in replies]

    config = PPOConfig(
        num_updates=1, batch_size=2, minibatch_size=2, n_ppo_epochs=1, max_new_tokens=16
    )
    result = improve_policy(
        algorithm="ppo",
        base_model=smollm2,
        parent_adapter=pi0,
        prompts=prompts,
        reward_fn=shortness,
        config=config,
        output_dir=tmp_path / "pi1",
    )
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert lora_weights(result.adapter_dir).keys() == lora_weights(pi0).keys()
    assert result.history and all(math.isfinite(v) for v in result.metrics.values())
    assert abs(result.history[0]["kl_ref"]) < 1e-3  # one rollout, taken before any update


# -- the sampler and the scorer are one distribution ------------------------------------------


def record_processed_scores(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Make model.generate also keep the scores it sampled from (after every logits processor);
    the sampling itself is left alone. Returns the list the scores of each call land in."""
    real_generate = model.generate
    recorded: list[torch.Tensor] = []

    def generate_keeping_scores(*args: Any, **kwargs: Any) -> Any:
        generation = copy.deepcopy(kwargs.pop("generation_config"))
        generation.return_dict_in_generate = True
        generation.output_scores = True
        out = real_generate(*args, generation_config=generation, **kwargs)
        recorded.append(torch.stack(out.scores, dim=1))  # (B, C, V)
        return out.sequences

    monkeypatch.setattr(model, "generate", generate_keeping_scores)
    return recorded


def sampled_logprobs(scores: torch.Tensor, replies: torch.Tensor) -> torch.Tensor:
    """log-probability of each sampled token under the distribution the sampler drew it from."""
    return torch.log_softmax(scores, dim=-1).gather(-1, replies.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.usefixtures("one_thread")
def test_sampler_and_scorer_agree_whatever_the_base_generation_config_says(
    top_p: float,
    opinionated_model: Path,
    tiny_adapters: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rollout log-probs PPO scores are those of the distribution generate() sampled from
    (after every logits processor it ran), with the nucleus when top_p < 1."""
    temperature = 0.7
    tokenizer = load_tokenizer(opinionated_model)
    model = load_policy(opinionated_model, tiny_adapters["noisy"], "cpu")
    model.load_adapter(str(tiny_adapters["noisy"]), REFERENCE_ADAPTER, is_trainable=False)
    model.eval()
    recorded = record_processed_scores(model, monkeypatch)
    torch.manual_seed(0)
    rollout = sample_replies(
        model, tokenizer, TRAIN_PROMPTS[:6], max_new_tokens=12, temperature=temperature, top_p=top_p
    )
    [scores] = recorded
    replies = rollout.input_ids[:, rollout.prompt_length :]
    value_head = ValueHead(model.config.hidden_size)
    logprobs, ref_logprobs, _, entropy, nucleus = score_rollout(
        model, value_head, rollout, temperature, top_p, chunk_size=4
    )
    mask = rollout.reply_mask.bool()
    assert torch.allclose(sampled_logprobs(scores, replies)[mask], logprobs[mask], atol=1e-4)
    # The reference (here the same adapter) is scored over the same nucleus: a KL of zero.
    assert torch.allclose(ref_logprobs[mask], logprobs[mask], atol=1e-5)
    assert torch.isfinite(entropy).all()
    if top_p < 1.0:
        assert nucleus is not None
        sampler_nucleus = scores > -float("inf")
        assert torch.equal(nucleus[mask], sampler_nucleus[mask])
        assert bool((nucleus[mask].sum(-1) < nucleus.shape[-1]).any()), "top_p must cut here"
    else:
        assert nucleus is None


# -- PPO's mechanics on real rollouts ---------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_rollout_mask_and_reward_placement_at_the_end_token_and_at_the_cut(
    tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    tokenizer = load_tokenizer(tiny_model)
    model = load_policy(tiny_model, tiny_adapters["zero"], "cpu")
    model.eval()
    # A third of the vocabulary ends a reply, so that in 40 replies of at most 4 tokens some
    # end at an end token and some are cut at the limit.
    ends = sorted({*range(4, len(tokenizer), 3), tokenizer.eos_token_id})
    model.get_base_model().generation_config.eos_token_id = ends
    torch.manual_seed(0)
    rollout = sample_replies(
        model, tokenizer, TRAIN_PROMPTS * 2, max_new_tokens=4, temperature=1.0, top_p=1.0
    )
    replies = rollout.input_ids[:, rollout.prompt_length :].tolist()
    q = torch.linspace(0.5, 1.0, len(replies))
    rewards = token_rewards(q, torch.zeros_like(rollout.reply_mask), rollout.reply_mask, 0.1)
    ended = cut = 0
    for row, (reply, mask) in enumerate(zip(replies, rollout.reply_mask.tolist(), strict=True)):
        first_end = next((i for i, token in enumerate(reply) if token in ends), None)
        if first_end is None:  # cut at max_new_tokens: every token counts, Q on the last one
            cut += 1
            assert len(reply) == 4
            last = 3
        else:  # ended: tokens up to and including the end token, Q on the end token
            ended += 1
            last = first_end
        assert mask == [1.0] * (last + 1) + [0.0] * (len(reply) - last - 1), row
        expected_rewards = [0.0] * len(reply)
        expected_rewards[last] = float(q[row])
        assert rewards[row].tolist() == pytest.approx(expected_rewards), row
    assert ended >= 5 and cut >= 5, (ended, cut)
    reply_attention = rollout.attention_mask[:, rollout.prompt_length :]
    assert torch.equal(reply_attention, rollout.reply_mask.long())


def test_pack_rows_by_hand() -> None:
    # Two rows share the prompt's first two tokens; the second repeats the first's prompt.
    packed = pack_rows([([1, 2, 3], [4, 5]), ([1, 2, 6], [7]), ([1, 2, 3], [8, 9, 10])], width=4)
    # Each distinct prefix once, a reply's last token left out (it predicts nothing).
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 6, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert packed.before.tolist() == [[2, 3, 0, 0], [4, 0, 0, 0], [2, 5, 6, 0]]
    assert packed.targets.tolist() == [[4, 5, 0, 0], [7, 0, 0, 0], [8, 9, 10, 0]]
    assert packed.mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert packed.keep.tolist() == [2, 3, 4, 5, 6]
    assert packed.keep[packed.keep_index][packed.mask.bool()].tolist() == [2, 3, 4, 2, 5, 6]
    sees = packed.attention_mask[0, 0] == 0
    expected = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 4], 5: [0, 1, 2, 5]}
    expected[6] = [0, 1, 2, 5, 6]
    for token, ancestors in expected.items():
        assert torch.nonzero(sees[token]).flatten().tolist() == ancestors, token


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("attention", ["dense", "tree"])
def test_packed_rows_score_and_back_propagate_as_each_row_alone(
    tiny_model: Path, tiny_adapters: dict[str, Path], attention: str
) -> None:
    """Log-probs, hidden states and the gradient of the packed rows equal those of each row's
    own forward pass (the definition), and shared prefixes are computed once: under the dense
    tree mask and under tree attention (only the blocks that mask keeps)."""
    temperature = 0.7
    tokenizer = load_tokenizer(tiny_model)
    model = load_policy(tiny_model, tiny_adapters["noisy"], "cpu")
    model.eval()
    if attention == "tree":
        enable_tree_attention(model)
        assert uses_tree_attention(model)

    def ids(messages: list[ChatMessage]) -> list[int]:
        text = tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    turn = [ChatMessage("assistant", "Sure, we can."), ChatMessage("user", "When?")]
    prompts = [
        ids(TRAIN_PROMPTS[0]),
        ids([*TRAIN_PROMPTS[0], *turn]),  # the first prompt's conversation, one turn on
        ids(TRAIN_PROMPTS[1]),
        ids(TRAIN_PROMPTS[0]),  # the same state twice, replies that part after one token
    ]
    generator = torch.Generator().manual_seed(0)
    replies = [torch.randint(5, 200, (n,), generator=generator).tolist() for n in (5, 3, 6, 4)]
    replies[3][0] = replies[0][0]
    rows = list(zip(prompts, replies, strict=True))
    packed = pack_rows(rows)
    distinct = {tuple([*p, *r[:-1]][:k]) for p, r in rows for k in range(1, len(p) + len(r))}
    assert packed.tokens == len(distinct) < sum(len(p) + len(r) - 1 for p, r in rows)

    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        return [g.clone() for g in torch.autograd.grad(loss, trainable)]

    logprobs, _, hidden = reply_forward(model, packed, temperature)
    packed_loss = (logprobs * packed.mask).sum() + (head(hidden) * packed.mask).sum()
    packed_grads = gradients(packed_loss)

    alone_loss = torch.zeros(())
    for row, (prompt, reply) in enumerate(rows):
        output = model(input_ids=torch.tensor([prompt + reply]), output_hidden_states=True)
        logits = output.logits[0, len(prompt) - 1 : -1] / temperature
        alone = torch.log_softmax(logits, -1).gather(-1, torch.tensor(reply)[:, None])[:, 0]
        alone_hidden = output.hidden_states[-1][0, len(prompt) - 1 : -1]
        n = len(reply)
        assert torch.allclose(logprobs[row, :n], alone, atol=1e-5), row
        assert torch.allclose(hidden[row, :n], alone_hidden, atol=1e-5), row
        assert torch.all(logprobs[row, n:] == 0) and torch.all(hidden[row, n:] == 0), row
        alone_loss = alone_loss + alone.sum() + head(alone_hidden).sum()
    assert torch.allclose(packed_loss, alone_loss, atol=1e-4)
    for packed_grad, alone_grad in zip(packed_grads, gradients(alone_loss), strict=True):
        scale = float(alone_grad.abs().max())
        assert float((packed_grad - alone_grad).abs().max()) <= 1e-4 * scale, scale
    assert any(g.abs().max() > 1e-3 for g in packed_grads)


@pytest.mark.usefixtures("one_thread")
def test_packed_rows_over_a_nucleus_score_and_back_propagate_as_the_definition(
    tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    """With top_p < 1 only the nuclei's tokens are projected: log-probs, entropies and the
    gradient still equal log_softmax over each token's nucleus of the full logits, row alone."""
    temperature, top_p = 0.7, 0.3
    tokenizer = load_tokenizer(tiny_model)
    model = load_policy(tiny_model, tiny_adapters["noisy"], "cpu")
    model.eval()
    texts = [
        tokenizer.apply_chat_template(
            [m.as_dict() for m in prompt], tokenize=False, add_generation_prompt=True
        )
        for prompt in TRAIN_PROMPTS[:3]
    ]
    prompts = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    generator = torch.Generator().manual_seed(1)
    replies = [torch.randint(5, 200, (n,), generator=generator).tolist() for n in (4, 6, 2)]
    rows = list(zip(prompts, replies, strict=True))
    packed = pack_rows(rows)
    vocab = model.config.vocab_size
    nucleus = torch.ones((len(rows), packed.targets.shape[1], vocab), dtype=torch.bool)
    alone_loss = torch.zeros(())
    alone_results = []
    for row, (prompt, reply) in enumerate(rows):
        logits = model(input_ids=torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1]
        logits = logits / temperature
        kept = nucleus_mask(logits.detach(), top_p).scatter(-1, torch.tensor(reply)[:, None], True)
        nucleus[row, : len(reply)] = kept
        restricted = logits.masked_fill(~kept, float("-inf"))
        logprobs = torch.log_softmax(restricted, -1).gather(-1, torch.tensor(reply)[:, None])[:, 0]
        probs = torch.softmax(restricted, -1)
        entropy = -(probs * torch.log_softmax(restricted, -1).nan_to_num(neginf=0.0)).sum(-1)
        alone_results.append((logprobs.detach(), entropy.detach()))
        alone_loss = alone_loss + logprobs.sum()
    assert int(nucleus[packed.mask.bool()].any(0).sum()) < vocab * 0.9  # a real restriction

    trainable = [p for p in model.parameters() if p.requires_grad]
    logprobs, entropy, _ = reply_forward(model, packed, temperature, nucleus=nucleus)
    for row, (expected_logprobs, expected_entropy) in enumerate(alone_results):
        n = len(replies[row])
        assert torch.allclose(logprobs[row, :n], expected_logprobs, atol=1e-5), row
        assert torch.allclose(entropy[row, :n], expected_entropy, atol=1e-5), row
    packed_grads = torch.autograd.grad(logprobs.sum(), trainable)
    alone_grads = torch.autograd.grad(alone_loss, trainable)
    for packed_grad, alone_grad in zip(packed_grads, alone_grads, strict=True):
        scale = float(alone_grad.abs().max())
        assert float((packed_grad - alone_grad).abs().max()) <= 1e-4 * scale, scale


# -- rollouts through the serving engine ------------------------------------------------------


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_the_engine_rollout_is_what_the_trainer_would_score(
    top_p: float, tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    """Everything PPO takes from the engine instead of a scoring pass (log-probs under the
    policy and pi_i, over the nucleus; values from the hidden states; entropies) equals
    score_rollout's on the same sampled sequences."""
    temperature = 0.7
    tokenizer = load_tokenizer(tiny_model)
    model = load_policy(tiny_model, tiny_adapters["noisy"], "cpu")
    model.load_adapter(str(tiny_adapters["zero"]), REFERENCE_ADAPTER, is_trainable=False)
    model.eval()
    config = PPOConfig(batch_size=6, minibatch_size=2, device="cpu")
    engine = rollout_engine(model, tokenizer, config)
    assert engine is not None
    try:
        sync_policy(engine, model)
        prompts = [*TRAIN_PROMPTS[:5], _prompt(" ".join(_WORDS[:30]))]  # prompt lengths differ
        served = sample_from_engine(
            engine,
            tokenizer,
            prompts,
            max_new_tokens=10,
            temperature=temperature,
            top_p=top_p,
            seed=1,
        )
    finally:
        engine.close()
    value_head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(value_head.linear.weight)  # a non-zero head: values must match too
    logprobs, ref_logprobs, values, entropy, nucleus = score_rollout(
        model, value_head, served.rollout, temperature, top_p, chunk_size=4
    )
    mask = served.rollout.reply_mask.bool()
    assert torch.allclose(served.logprobs[mask], logprobs[mask], atol=1e-4)
    assert torch.allclose(served.ref_logprobs[mask], ref_logprobs[mask], atol=1e-4)
    assert not torch.allclose(served.ref_logprobs[mask], served.logprobs[mask], atol=1e-2)
    with torch.no_grad():
        assert torch.allclose(value_head(served.hidden)[mask], values[mask], atol=1e-4)
    assert torch.allclose(served.entropy[mask], entropy[mask], atol=1e-4)
    if top_p < 1.0:
        assert served.nucleus is not None and nucleus is not None
        assert torch.equal(served.nucleus[mask], nucleus[mask])
    else:
        assert served.nucleus is None and nucleus is None
    # The layout is sample_replies': left-padded prompts, the replies' own tokens after them.
    for row, (ids, reply) in enumerate(zip(served.prompts, served.replies, strict=True)):
        start = served.rollout.prompt_length
        assert served.rollout.input_ids[row, start - len(ids) : start].tolist() == ids
        assert served.rollout.input_ids[row, start : start + len(reply)].tolist() == reply


def test_before_the_first_update_pi_i_log_probs_are_the_samplers(
    tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    """PPO's first rollout takes pi_i's log-probs from the sampler (policy and pi_i are then the
    same file): what a teacher-forced pass of pi_i gives on the same samples."""
    tokenizer = load_tokenizer(tiny_model)
    model = load_policy(tiny_model, tiny_adapters["noisy"], "cpu")
    model.load_adapter(str(tiny_adapters["noisy"]), REFERENCE_ADAPTER, is_trainable=False)
    model.eval()
    engine = rollout_engine(model, tokenizer, PPOConfig(batch_size=4, minibatch_size=2))
    assert engine is not None
    rollouts = {}
    try:
        sync_policy(engine, model)
        for shortcut in (False, True):
            rollouts[shortcut] = sample_from_engine(
                engine,
                tokenizer,
                TRAIN_PROMPTS[:4],
                max_new_tokens=8,
                temperature=0.7,
                top_p=0.9,
                seed=3,
                policy_is_reference=shortcut,
            )
    finally:
        engine.close()
    scored, shortcut = rollouts[False], rollouts[True]
    mask = scored.rollout.reply_mask.bool()
    assert torch.equal(scored.rollout.input_ids, shortcut.rollout.input_ids)  # same samples
    assert torch.equal(shortcut.ref_logprobs, shortcut.logprobs)
    assert torch.allclose(scored.ref_logprobs[mask], shortcut.ref_logprobs[mask], atol=1e-4)


def test_a_stale_adapter_in_the_engine_stops_ppo(
    tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    tokenizer = load_tokenizer(tiny_model)
    model = load_policy(tiny_model, tiny_adapters["noisy"], "cpu")
    model.load_adapter(str(tiny_adapters["noisy"]), REFERENCE_ADAPTER, is_trainable=False)
    model.eval()
    engine = rollout_engine(model, tokenizer, PPOConfig(batch_size=4, minibatch_size=2))
    assert engine is not None
    try:
        sync_policy(engine, model)
        served = sample_from_engine(
            engine,
            tokenizer,
            TRAIN_PROMPTS[:2],
            max_new_tokens=8,
            temperature=1.0,
            top_p=1.0,
            seed=0,
        )
        probe = list(zip(served.prompts, served.replies, strict=True))
        assert check_served_logprobs(engine, model, probe, 1.0, 0.05) < 1e-3
        with torch.no_grad():  # an optimiser step the engine has not seen
            for name, parameter in model.named_parameters():
                if "lora_B.default" in name:
                    parameter.add_(0.5 * torch.randn_like(parameter))
        with pytest.raises(LogprobMismatch, match="not sampling the policy being trained"):
            check_served_logprobs(engine, model, probe, 1.0, 0.05)
        # PPO's probe keeps only its prompt's last tokens: that shows the stale weights too.
        short = [(p[-PROBE_PROMPT_TOKENS:], r) for p, r in probe]
        assert all(len(p) == PROBE_PROMPT_TOKENS for p, _ in short)
        with pytest.raises(LogprobMismatch, match="not sampling the policy being trained"):
            check_served_logprobs(engine, model, short, 1.0, 0.05)
        sync_policy(engine, model)
        assert check_served_logprobs(engine, model, probe, 1.0, 0.05) < 1e-3
    finally:
        engine.close()


def test_check_rollout_logprobs_by_hand() -> None:
    trained = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    served = torch.tensor([[-1.0, -2.01, 0.0], [-0.5, -0.45, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's third entry is padding
    assert check_rollout_logprobs(trained, served, mask, 0.06) == pytest.approx(0.05)
    with pytest.raises(LogprobMismatch, match="replies it sampled"):
        check_rollout_logprobs(trained, served, mask, 0.04)


@pytest.mark.usefixtures("one_thread")
def test_ppo_stops_when_the_engine_misses_a_sync_even_past_the_probe(
    tiny_model: Path,
    tiny_adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine keeps sampling the first update's policy and the fixed probe looks away:
    the check of the first minibatch's replies still stops PPO at the second update."""
    import workers.learning.ppo as ppo

    synced: list[int] = []

    def first_sync_only(engine: Any, model: Any) -> None:
        if not synced:
            ppo_sync(engine, model)
        synced.append(1)

    ppo_sync = ppo.sync_policy
    monkeypatch.setattr(ppo, "sync_policy", first_sync_only)
    monkeypatch.setattr(ppo, "check_served_logprobs", lambda *args: 0.0)
    config = PPOConfig(
        num_updates=2,
        batch_size=8,
        minibatch_size=4,
        max_new_tokens=8,
        learning_rate=3e-2,
        temperature=TOY_TEMPERATURE,
        device="cpu",
    )
    with pytest.raises(LogprobMismatch, match="replies it sampled"):
        improve_policy(
            algorithm="ppo",
            base_model=tiny_model,
            parent_adapter=tiny_adapters["zero"],
            prompts=TRAIN_PROMPTS,
            reward_fn=newline_reward,
            config=config,
            output_dir=tmp_path / "pi1",
        )
    assert len(synced) == 2


def test_prompt_batches_by_conversation_keep_each_conversations_states_together() -> None:
    from workers.learning.ppo import _prompt_batches

    def state(conversation: int, turns: int) -> list[ChatMessage]:
        messages = [ChatMessage("system", "acme"), ChatMessage("user", f"hello {conversation}")]
        for turn in range(turns):
            messages += [ChatMessage("assistant", f"a{turn}"), ChatMessage("user", f"u{turn}")]
        return messages

    sizes = [3, 1, 4, 2, 2]
    prompts = [state(c, t) for c, size in enumerate(sizes) for t in range(size)]
    conversation_of = [c for c, size in enumerate(sizes) for _ in range(size)]
    n = len(prompts)

    # Drawn anywhere: shuffled passes over the prompts, as torch.randperm deals them.
    batches = _prompt_batches(prompts, 4, torch.Generator().manual_seed(3))
    stream = [i for _ in range(3 * n // 4) for i in next(batches)]
    generator = torch.Generator().manual_seed(3)
    assert stream == [i for _ in range(3) for i in torch.randperm(n, generator=generator).tolist()]

    # By conversation: each pass has every prompt once, each conversation's states in a run.
    batches = _prompt_batches(prompts, 4, torch.Generator().manual_seed(3), by_conversation=True)
    stream = [i for _ in range(3 * n // 4) for i in next(batches)]
    for start in range(0, len(stream), n):
        one_pass = stream[start : start + n]
        assert sorted(one_pass) == list(range(n))
        runs = [
            conversation_of[i]
            for k, i in enumerate(one_pass)
            if k == 0 or conversation_of[i] != conversation_of[one_pass[k - 1]]
        ]
        assert sorted(runs) == list(range(len(sizes))), one_pass  # one run each
        assert one_pass == sorted(one_pass, key=lambda i: (runs.index(conversation_of[i]), i))
    firsts = {tuple(stream[start : start + n]) for start in range(0, len(stream), n)}
    assert len(firsts) > 1  # the conversations' order is shuffled pass to pass


def test_tree_segments_keep_exactly_what_the_dense_tree_mask_keeps() -> None:
    """Each query token, in the segment that holds it, sees exactly the keys the dense mask of
    pack_rows lets it see (its ancestors and itself), and the segments cover every token once."""
    generator = torch.Generator().manual_seed(3)
    system = torch.randint(5, 50, (6,), generator=generator).tolist()
    rows = []
    for n_state, n_reply in ((4, 3), (2, 5), (4, 3), (0, 2), (7, 1)):
        state = torch.randint(5, 50, (n_state,), generator=generator).tolist()
        rows.append(
            (system + state, torch.randint(5, 50, (n_reply,), generator=generator).tolist())
        )
    rows.append((rows[0][0], [*rows[0][1][:1], 7, 8]))  # parts from row 0 inside its reply
    rows.append((rows[0][0][:5], [9]))  # inside row 0's prompt: adds nothing new but its reply
    packed = pack_rows(rows)
    dense = packed.attention_mask[0, 0] == 0  # True where a token may see another
    rebuilt = torch.zeros_like(dense)
    covered = []
    for segment in packed.segments:
        covered.extend(range(segment.start, segment.end))
        for i, query in enumerate(range(segment.start, segment.end)):
            rebuilt[query, segment.keys[segment.mask[i]]] = True
    assert covered == list(range(packed.tokens))
    assert torch.equal(rebuilt, dense)
