"""RLOO and GRPO through TRL, via improve_policy, on the tiny random model: they learn the toy
reward, save one adapter with the parent's shape, and take pi_i (not the base) as reference."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from services.policies.prompt import ChatMessage
from tests.learning.test_ppo import (
    TOY_NEW_TOKENS,
    TOY_TEMPERATURE,
    TRAIN_PROMPTS,
    lora_weights,
    mean_reward,
    newline_reward,
    one_thread,  # noqa: F401  (a fixture, used by name below)
)
from workers.learning.configs import GRPOConfig, RLOOConfig
from workers.learning.improve import Algorithm, improve_policy

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS: dict[str, type[RLOOConfig] | type[GRPOConfig]] = {"rloo": RLOOConfig, "grpo": GRPOConfig}


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_trl_learns_the_toy_reward(
    algorithm: Algorithm, tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    parent = tiny_adapters["zero"]
    reported: list[tuple[str, float]] = []
    config = CONFIGS[algorithm](
        num_steps=30,
        prompts_per_step=8,
        num_generations=4,
        learning_rate=3e-3,
        beta=0.01,
        max_new_tokens=TOY_NEW_TOKENS,
        temperature=TOY_TEMPERATURE,
        device="cpu",
        seed=0,
    )
    result = improve_policy(
        algorithm=algorithm,
        base_model=tiny_model,
        parent_adapter=parent,
        prompts=TRAIN_PROMPTS,
        reward_fn=newline_reward,
        config=config,
        output_dir=tmp_path / "pi1",
        progress=lambda stage, fraction: reported.append((stage, fraction)),
    )

    # Measured on the held-out prompts, 0.06 before: seed 0 reached 0.41 (RLOO) and 0.34
    # (GRPO); over seeds 0-3 the smallest gain was +0.09 (RLOO, seed 1), hence the margin.
    before = mean_reward(tiny_model, parent)
    after = mean_reward(tiny_model, result.adapter_dir)
    assert after > before + 0.05, (before, after)

    old, new = lora_weights(parent), lora_weights(result.adapter_dir)
    assert new.keys() == old.keys()  # TRL's "ref" copy is not saved with it
    assert any(not torch.equal(new[k], old[k]) for k in old if "lora_B" in k)
    assert [p.name for p in result.adapter_dir.iterdir() if p.is_dir()] == []

    assert len(result.history) == 30
    for metrics in result.history:
        for key in ("q_mean", "kl", "kl_ref_per_token", "loss", "entropy"):
            assert math.isfinite(metrics[key]), (key, metrics)
    assert result.history[-1]["kl"] > 0
    assert result.metrics["q_mean_first"] == result.history[0]["q_mean"]
    assert (algorithm, 1.0) in reported and reported[-1] == ("done", 1.0)


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_trl_kl_reference_is_the_parent_policy(
    algorithm: Algorithm, tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    # The noisy parent is far from the base model (test_ppo.py measures it), so a KL of zero
    # at the first step, when the policy still equals the parent, means the reference is pi_i.
    def letters(states: Sequence[list[ChatMessage]], replies: Sequence[str]) -> list[float]:
        return [sum(c.isalpha() for c in reply) / max(len(reply), 1) for reply in replies]

    config = CONFIGS[algorithm](
        num_steps=2,
        prompts_per_step=4,
        num_generations=4,
        learning_rate=1e-2,
        beta=0.1,
        max_new_tokens=8,
        device="cpu",
    )
    result = improve_policy(
        algorithm=algorithm,
        base_model=tiny_model,
        parent_adapter=tiny_adapters["noisy"],
        prompts=TRAIN_PROMPTS,
        reward_fn=letters,
        config=config,
        output_dir=tmp_path / "pi1",
    )
    first, second = result.history
    assert abs(first["kl"]) < 1e-6
    assert abs(second["kl"]) > 1e-6  # one update later the policy has moved away from pi_i
