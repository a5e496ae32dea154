"""The least time this machine needs for the matrix products a PPO sample asks of a Llama.

A PPO sample is a rollout (the prompt's prefill, the reply's decode, pi_i's log-probs, the
served-log-prob probe) and the optimisation (a forward and a backward per epoch). Nearly all
of it is the model's linear layers; on a CPU in float32 they run at whatever rate the machine's
GEMM reaches. So:

    floor (s / sample) = linear-layer FLOPs per sample / the best GEMM rate seen in this run

is a lower bound on what any implementation of the same computation takes here (attention,
norms and the decode's weight reads are left out, and the GEMM rate is the best of several
tries on the model's own shapes). A measured time close to it is compute at the machine's
rate; a target under it cannot be met by engineering, only by computing less.

Counted per token, from the model's config: every layer's q/k/v, o, gate/up and down
projections (2 x in x out each); the vocabulary projection only where a token's logits are
used. The backward of a frozen base with trainable LoRA adapters computes the gradient with
respect to each projection's input (the same products as the forward) but not its weight,
except where nothing upstream needs it: the first layer's q/k/v (its input is the frozen
embedding). The adapters' own products (rank 16) are left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LinearFlops:
    """FLOPs of a Llama's linear layers for one token."""

    layers: int  # every decoder layer's projections, forward
    head: int  # the vocabulary projection, forward, for one token whose logits are used
    first_qkv: int  # the first layer's q/k/v projections, forward

    def forward(self, tokens: int, logits: int) -> int:
        return self.layers * tokens + self.head * logits

    def backward(self, tokens: int, logits: int) -> int:
        """The input gradients of a frozen base under LoRA (see the module's doc)."""
        return (self.layers - self.first_qkv) * tokens + self.head * logits


def linear_flops(config: Any) -> LinearFlops:
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv = int(config.num_key_value_heads) * head_dim
    q = heads * head_dim
    qkv = 2 * hidden * (q + 2 * kv)
    per_layer = qkv + 2 * q * hidden + 3 * 2 * hidden * int(config.intermediate_size)
    return LinearFlops(
        layers=per_layer * int(config.num_hidden_layers),
        head=2 * hidden * int(config.vocab_size),
        first_qkv=qkv,
    )


def gemm_rate(config: Any, rows: int = 512, tries: int = 5) -> float:
    """FLOP/s of float32 F.linear over one decoder layer's projections at `rows` tokens (the
    size of a packed minibatch), the best of `tries` (each a few passes, after a warm-up)."""
    import torch

    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    q, kv = heads * head_dim, int(config.num_key_value_heads) * head_dim
    inter = int(config.intermediate_size)
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden)]
    shapes += [(hidden, inter), (hidden, inter), (inter, hidden)]
    generator = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(rows, i, generator=generator), torch.randn(o, i, generator=generator))
        for i, o in shapes
    ]
    flops = sum(2 * rows * i * o for i, o in shapes)
    best = 0.0
    with torch.no_grad():
        for attempt in range(tries + 1):
            started = time.perf_counter()
            for _ in range(4):
                for x, w in pairs:
                    torch.nn.functional.linear(x, w)
            elapsed = time.perf_counter() - started
            if attempt:  # the first is the warm-up
                best = max(best, 4 * flops / elapsed)
    return best


@dataclass(frozen=True)
class SampleWork:
    """Tokens one PPO update computed, summed over its rollout and optimisation."""

    samples: int
    forward_tokens: int  # rollout: prefill, decode, pi_i's log-probs, the probe
    forward_logits: int  # rollout: tokens whose logits were computed
    train_tokens: int  # optimisation: packed tokens, every minibatch and epoch
    train_logits: int  # optimisation: reply tokens whose logits were used

    def flops(self, linear: LinearFlops) -> float:
        rollout = linear.forward(self.forward_tokens, self.forward_logits)
        train = linear.forward(self.train_tokens, self.train_logits) + linear.backward(
            self.train_tokens, self.train_logits
        )
        return (rollout + train) / self.samples
