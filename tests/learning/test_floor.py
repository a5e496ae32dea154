"""The PPO floor's FLOP count (tests/benchmarks/floor.py) against what a LoRA model's linear
layers compute, counted at every layer in a forward and a backward (tiny model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.benchmarks.floor import SampleWork, gemm_rate, linear_flops
from workers.learning.policy_model import load_policy
from workers.learning.ppo import pack_rows


def frozen_linears(model: nn.Module) -> list[nn.Linear]:
    """The base model's projections: every plain nn.Linear but the adapters' own."""
    return [
        m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and "lora_" not in name and not m.weight.requires_grad
    ]


def test_linear_flops_are_what_the_layers_compute_forward_and_backward(
    tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    model = load_policy(tiny_model, tiny_adapters["noisy"], "cpu")
    counted = {"forward": 0, "backward": 0}

    def on_forward(module: nn.Linear, inputs: Any, output: torch.Tensor) -> None:
        rows = output.numel() // module.out_features
        counted["forward"] += 2 * rows * module.in_features * module.out_features

    def on_backward(module: nn.Linear, grad_input: Any, grad_output: Any) -> None:
        if grad_input[0] is not None:  # the gradient with respect to the layer's input
            rows = grad_input[0].numel() // module.in_features
            counted["backward"] += 2 * rows * module.in_features * module.out_features

    for module in frozen_linears(model):
        module.register_forward_hook(on_forward)
        module.register_full_backward_hook(on_backward)
    # Two rows sharing a prompt prefix, packed as PPO packs them.
    rows = [([5, 6, 7, 8, 9], [10, 11, 12]), ([5, 6, 7, 20], [21, 22, 23, 24])]
    packed = pack_rows(rows)
    output = model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=packed.attention_mask,
        logits_to_keep=packed.keep,
    )
    output.logits.sum().backward()

    flops = linear_flops(model.config)
    tokens, logits = packed.tokens, len(packed.keep)
    # Each row's prompt and reply but its last token; the shared 3 tokens once.
    assert (tokens, logits) == ((5 + 2) + (4 + 3 - 3), 3 + 4)
    assert counted["forward"] == flops.forward(tokens, logits)
    assert counted["backward"] == flops.backward(tokens, logits)
    assert 0 < counted["backward"] < counted["forward"]  # the first layer's q/k/v skipped
    work = SampleWork(
        samples=2, forward_tokens=20, forward_logits=7, train_tokens=tokens, train_logits=logits
    )
    assert (
        work.flops(flops) == (flops.forward(20, 7) + counted["forward"] + counted["backward"]) / 2
    )


def test_gemm_rate_is_a_positive_rate(tiny_model: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_model))
    rate = gemm_rate(config, rows=64, tries=2)
    assert 1e6 < rate < 1e14  # FLOP/s on any CPU this runs on
