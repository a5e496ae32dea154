"""A decoder for the served model that keeps the machine busy: every arm a LoRA adapter applied
per row (several arms in one batch, the base weights read once per step), a preallocated KV
cache, continuous batching (a request joins the running batch between two decode steps), the KV
of a prompt's already-seen prefix reused (every suggestion of a business starts with the same
system prompt; a request that shares a long prefix with one admitted beside it waits one step to
reuse it rather than prefill it again), and each token's log-prob under the distribution it was
drawn from.

Why not transformers' generate(): on 2 CPU cores it reached 9.6 / 42.6 tok/s at 1 / 16
concurrent requests (README, "Generation speed"). Its per-step cost is mostly Python and
bookkeeping (a dynamic cache, logits processors, peft's per-adapter masks), every batch waits for
its slowest row, and each prompt is prefilled in full. This file is plain torch over the
weights of a Llama-family checkpoint (Llama, SmolLM, Mistral without sliding windows, Qwen2's
biases); anything else raises `UnsupportedModel` and the caller keeps generate().

The math is transformers' LlamaForCausalLM's (RMSNorm, rotary embeddings from the model's own
rotary module, grouped-query attention, SwiGLU) and peft's LoRA (base(x) + B(A(x)) * scale), so
greedy text equals generate()'s (tests/learning/test_engine.py) and log-probs match a teacher-
forced forward pass of the trainer's model: what PPO and the off-policy estimates need.
Sampling is softmax(logits / T) cut to the top_p nucleus exactly as TopPLogitsWarper cuts it,
nothing else; T = 0 is greedy and its log-probs are those of softmax(logits).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# The module names a LoRA may target, by the fused projection they belong to.
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
TOP_P_CANDIDATES = 1024  # the nucleus is looked for among the top-k first (exact; see _nucleus)
# A request waits one step when one admitted beside it shares this many more prompt tokens than
# the prefix cache holds: one step of latency against prefilling the shared part twice.
DEFER_TOKENS = 32


class UnsupportedModel(ValueError):
    """The checkpoint or adapter is not one this decoder reproduces exactly."""


class EngineTimeout(Exception):
    """A request's deadline passed before it finished."""


class EngineClosed(Exception):
    pass


@dataclass(frozen=True)
class DecodeParams:
    """One request's sampling: T = 0 is greedy; seed makes a request reproducible on its own."""

    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    trace: bool = False  # keep what a trainer needs per token (see Trace)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError("max_new_tokens and n must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass(frozen=True)
class Trace:
    """Per generated token, what PPO needs from the sampler so that it need not recompute it:
    the final hidden state that predicted the token (C, H), the nucleus it was drawn from (the
    kept token ids; None when greedy) and that distribution's entropy."""

    hidden: Tensor
    nucleus: list[Tensor] | None
    entropy: list[float]


@dataclass(frozen=True)
class Sample:
    """One completion: its tokens (the end token included when it stopped on one), the sum of
    their log-probs and each one's."""

    tokens: list[int]
    logprob: float
    token_logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    trace: Trace | None = None


# -- weights --------------------------------------------------------------------------------


@dataclass
class _Layer:
    ln1: Tensor
    wqkv: Tensor
    bqkv: Tensor | None
    wo: Tensor
    bo: Tensor | None
    ln2: Tensor
    wgu: Tensor
    bgu: Tensor | None
    wdown: Tensor
    bdown: Tensor | None
    # oneDNN-packed copies of the four projections on a float32 CPU; see `LlamaWeights.pack`.
    packed: dict[str, Tensor] = field(default_factory=dict)

    def dense(self, group: str) -> tuple[Tensor, Tensor | None]:
        name = {"qkv": "qkv", "o": "o", "gate_up": "gu", "down": "down"}[group]
        return getattr(self, f"w{name}"), getattr(self, f"b{name}")


def onednn_usable(tensor: Tensor) -> bool:
    """Whether oneDNN's packed linear (the op torch.compile's CPU backend emits) can run it."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack_weight(weight: Tensor, batch_hint: int) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, packed: Tensor | None = None) -> Tensor:
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


@dataclass
class LlamaWeights:
    """The base model's weights, with q/k/v and gate/up fused into one matrix each."""

    embed: Tensor
    layers: list[_Layer]
    norm: Tensor
    lm_head: Tensor
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    cos: Tensor  # (max_positions, head_dim)
    sin: Tensor
    act: Any

    @property
    def max_positions(self) -> int:
        return int(self.cos.shape[0])

    @classmethod
    def from_model(cls, model: Any, max_positions: int) -> LlamaWeights:
        """From a transformers causal LM of a supported type (the tensors are shared or fused
        copies; the model may be dropped afterwards)."""
        from transformers.activations import ACT2FN

        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
            )
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < max_positions:
            raise UnsupportedModel(f"sliding-window attention ({window}) is not reproduced")
        inner = model.model
        n_heads = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
        max_positions = min(max_positions, int(config.max_position_embeddings))
        layers = []
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp

            def bias(*modules: Any) -> Tensor | None:
                parts = [m.bias for m in modules]
                if all(p is None for p in parts):
                    return None
                return torch.cat(
                    [
                        p.detach() if p is not None else torch.zeros_like(m.weight[:, 0])
                        for p, m in zip(parts, modules, strict=True)
                    ]
                )

            layers.append(
                _Layer(
                    ln1=block.input_layernorm.weight.detach(),
                    wqkv=torch.cat(
                        [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
                    ).detach(),
                    bqkv=bias(attn.q_proj, attn.k_proj, attn.v_proj),
                    wo=attn.o_proj.weight.detach(),
                    bo=bias(attn.o_proj),
                    ln2=block.post_attention_layernorm.weight.detach(),
                    wgu=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                    bgu=bias(mlp.gate_proj, mlp.up_proj),
                    wdown=mlp.down_proj.weight.detach(),
                    bdown=bias(mlp.down_proj),
                )
            )
        device = inner.embed_tokens.weight.device
        positions = torch.arange(max_positions, device=device)[None]
        probe = torch.zeros(1, dtype=inner.embed_tokens.weight.dtype, device=device)
        with torch.no_grad():
            cos, sin = inner.rotary_emb(probe, positions)
        return cls(
            embed=inner.embed_tokens.weight.detach(),
            layers=layers,
            norm=inner.norm.weight.detach(),
            lm_head=model.get_output_embeddings().weight.detach(),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate=int(config.intermediate_size),
            eps=float(config.rms_norm_eps),
            cos=cos[0],
            sin=sin[0],
            act=ACT2FN[config.hidden_act],
        )

    def pack(self, batch_hint: int) -> None:
        """Keep a oneDNN-packed copy of every projection (float32 CPU only). Measured here on
        30 layers' gate/up matrices read cold: at 1 / 16 rows, F.linear (MKL) took 29 / 38 ms,
        oneDNN's packed linear 13 / 16 ms; a decode step is mostly that stream of weights."""
        if not onednn_usable(self.embed):
            return
        for layer in self.layers:
            for group in FUSED_GROUPS:
                layer.packed[group] = pack_weight(layer.dense(group)[0], batch_hint)

    def group_shapes(self) -> dict[str, tuple[int, list[int]]]:
        """Per fused group: its input size and the output size of each member module."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        hidden = int(self.embed.shape[1])
        return {
            "qkv": (hidden, [q, kv, kv]),
            "o": (q, [hidden]),
            "gate_up": (hidden, [self.intermediate, self.intermediate]),
            "down": (self.intermediate, [hidden]),
        }


# -- adapters -------------------------------------------------------------------------------


@dataclass
class LoraArm:
    """A LoRA adapter as per-layer low-rank pairs on the fused projections: delta(x) =
    (x @ A.T) @ B.T with peft's scale folded into B. A group no module of which is adapted, or
    whose B is all zero (the pi_0 adapter), is None and costs nothing."""

    layers: list[dict[str, tuple[Tensor, Tensor] | None]]

    @classmethod
    def from_state(
        cls,
        weights: LlamaWeights,
        state: dict[str, Tensor],
        scales: dict[str, float] | float,
    ) -> LoraArm:
        """From peft tensors named like `...layers.{i}.self_attn.q_proj.lora_A.weight` (a saved
        adapter's or a live PeftModel's state dict); scales per module name or one for all."""
        found: dict[tuple[int, str], dict[str, Tensor]] = {}
        for name, tensor in state.items():
            if "lora_A" not in name and "lora_B" not in name:
                if "lora_" in name:
                    raise UnsupportedModel(f"adapter tensor {name} is not plain LoRA")
                continue
            parts = name.split(".")
            try:
                index = int(parts[parts.index("layers") + 1])
            except (ValueError, IndexError):
                raise UnsupportedModel(f"adapter tensor {name} is not in a decoder layer") from None
            module = next((p for p in parts if p.endswith("_proj")), None)
            if module is None:
                raise UnsupportedModel(f"adapter tensor {name} adapts no projection")
            which = "A" if "lora_A" in name else "B"
            found.setdefault((index, module), {})[which] = tensor.detach()
        shapes = weights.group_shapes()
        layers: list[dict[str, tuple[Tensor, Tensor] | None]] = []
        for index in range(len(weights.layers)):
            groups: dict[str, tuple[Tensor, Tensor] | None] = {}
            for group, members in FUSED_GROUPS.items():
                in_size, out_sizes = shapes[group]
                a_parts: list[Tensor] = []
                b_blocks: list[tuple[int, Tensor]] = []
                offset = 0
                for member, out_size in zip(members, out_sizes, strict=True):
                    pair = found.pop((index, member), None)
                    if pair is not None:
                        if set(pair) != {"A", "B"}:
                            raise UnsupportedModel(
                                f"layer {index} {member}: lora_A or lora_B missing"
                            )
                        a, b = pair["A"], pair["B"]
                        if a.shape[1] != in_size or b.shape[0] != out_size:
                            raise UnsupportedModel(f"layer {index} {member}: unexpected LoRA shape")
                        scale = scales if isinstance(scales, float) else scales[member]
                        if torch.count_nonzero(b):
                            a_parts.append(a)
                            b_blocks.append((offset, b * scale))
                    offset += out_size
                if not a_parts:
                    groups[group] = None
                    continue
                a_cat = torch.cat(a_parts)
                b_cat = torch.zeros(offset, a_cat.shape[0], dtype=a_cat.dtype, device=a_cat.device)
                column = 0
                for row, b in b_blocks:
                    b_cat[row : row + b.shape[0], column : column + b.shape[1]] = b
                    column += b.shape[1]
                groups[group] = (a_cat.to(weights.embed.dtype), b_cat.to(weights.embed.dtype))
            layers.append(groups)
        if found:
            raise UnsupportedModel(
                f"adapter adapts modules this decoder does not: {sorted(found)[:3]}"
            )
        return cls(layers)

    @classmethod
    def from_dir(cls, weights: LlamaWeights, path: str | Path) -> LoraArm:
        """From a saved peft adapter directory (adapter_config.json + adapter_model.safetensors)."""
        from safetensors.torch import load_file

        directory = Path(path)
        config = json.loads((directory / "adapter_config.json").read_text())
        return cls.from_state(
            weights,
            load_file(
                str(directory / "adapter_model.safetensors"), device=str(weights.embed.device)
            ),
            lora_scales(config),
        )

    @classmethod
    def from_peft(cls, weights: LlamaWeights, model: Any, adapter: str) -> LoraArm:
        """A snapshot of one adapter of a live PeftModel (a trainer's current weights)."""
        marker = f".{adapter}."
        state = {
            name.replace(marker, "."): parameter
            for name, parameter in model.named_parameters()
            if "lora_" in name and marker in name
        }
        if not state:
            raise UnsupportedModel(f"the model has no LoRA adapter named {adapter!r}")
        return cls.from_state(weights, state, lora_scales(model.peft_config[adapter].to_dict()))

    @classmethod
    def none(cls, weights: LlamaWeights) -> LoraArm:
        """The base model itself."""
        return cls([dict.fromkeys(FUSED_GROUPS) for _ in weights.layers])


def lora_scales(config: dict[str, Any]) -> dict[str, float]:
    """peft's scale per module name from an adapter_config: alpha / r (alpha / sqrt(r) with
    rsLoRA), refusing what changes the forward pass beyond that (DoRA, per-module ranks)."""
    if config.get("use_dora"):
        raise UnsupportedModel("DoRA adapters are not reproduced")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UnsupportedModel("per-module LoRA ranks or alphas are not reproduced")
    if config.get("fan_in_fan_out"):
        raise UnsupportedModel("fan_in_fan_out LoRA layers are not reproduced")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    modules = [m for members in FUSED_GROUPS.values() for m in members]
    return dict.fromkeys(modules, scale)


# -- the forward pass -----------------------------------------------------------------------


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _Groups:
    """Which rows of a batch use which arm: (arm, row indices or None for all rows)."""

    parts: list[tuple[LoraArm, Tensor | None]]


def _project(x: Tensor, layer: _Layer, groups: _Groups, index: int, group: str) -> Tensor:
    """A fused projection of the base, plus each arm's LoRA delta on its rows."""
    weight, bias = layer.dense(group)
    out = _linear(x, weight, bias, layer.packed.get(group))
    for arm, rows in groups.parts:
        pair = arm.layers[index][group]
        if pair is None:
            continue
        a, b = pair
        if rows is None:
            out = out + F.linear(F.linear(x, a), b)
        else:
            out.index_add_(0, rows, F.linear(F.linear(x.index_select(0, rows), a), b))
    return out


class KvCache:
    """Per layer K and V of shape (slots, kv_heads, capacity, head_dim). Rows of a decode batch
    are slots 0..B-1 (kept compact), so attention reads views, never gathered copies. Capacity
    grows in blocks as sequences need it."""

    def __init__(self, weights: LlamaWeights, slots: int, block: int = 256) -> None:
        self.w = weights
        self.slots = slots
        self.block = block
        self.capacity = 0
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []

    def ensure(self, length: int) -> None:
        if length <= self.capacity:
            return
        if length > self.w.max_positions:
            raise ValueError(f"sequence of {length} tokens exceeds {self.w.max_positions}")
        capacity = min(self.w.max_positions, math.ceil(length / self.block) * self.block)
        shape = (self.slots, self.w.n_kv_heads, capacity, self.w.head_dim)
        like = self.w.embed
        for store in (self.k, self.v):
            for layer in range(len(self.w.layers)):
                grown = torch.zeros(shape, dtype=like.dtype, device=like.device)
                if store and self.capacity:
                    grown[:, :, : self.capacity] = store[layer]
                if len(store) > layer:
                    store[layer] = grown
                else:
                    store.append(grown)
        self.capacity = capacity

    def move(self, source: int, target: int, length: int) -> None:
        for store in (self.k, self.v):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]


@dataclass(frozen=True)
class Segment:
    """Prompt tokens prefilled in a step: rows offset.. of the step's tokens, at positions
    start.. of slot."""

    slot: int
    start: int
    offset: int
    length: int


def forward_tokens(
    w: LlamaWeights,
    cache: KvCache,
    tokens: Tensor,
    slots: Tensor,
    positions: Tensor,
    decode: int,
    segments: Sequence[Segment],
    groups: _Groups,
) -> Tensor:
    """One forward pass over a step's tokens (T,): rows 0..decode-1 are one new token of each
    decoding slot 0..decode-1, the rows after them prompt segments. Every linear layer reads
    its weights once for all of them (on a CPU the weights' trip from memory is most of a
    decode step). Writes each token's K/V at (slot, position); returns the final hidden
    states (T, H)."""
    count = tokens.shape[0]
    cache.ensure(int(positions.max()) + 1)
    h = w.embed[tokens]
    cos, sin = w.cos[positions][:, None, :], w.sin[positions][:, None, :]
    q_size, kv_size = w.n_heads * w.head_dim, w.n_kv_heads * w.head_dim
    per_group = w.n_heads // w.n_kv_heads
    scale = 1.0 / math.sqrt(w.head_dim)
    if decode:
        longest = int(positions[:decode].max()) + 1
        visible = torch.arange(longest, device=tokens.device)[None, :] <= positions[:decode, None]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=tokens.device)
        bias = bias.masked_fill(~visible, float("-inf"))[:, None, None, :]  # (D, 1, 1, L)
    masks = [
        torch.arange(seg.start + seg.length, device=tokens.device)[None, :]
        <= torch.arange(seg.start, seg.start + seg.length, device=tokens.device)[:, None]
        for seg in segments
    ]
    for index, layer in enumerate(w.layers):
        x = _rms_norm(h, layer.ln1, w.eps)
        qkv = _project(x, layer, groups, index, "qkv")
        q = qkv[:, :q_size].view(count, w.n_heads, w.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(count, w.n_kv_heads, w.head_dim)
        v = qkv[:, q_size + kv_size :].view(count, w.n_kv_heads, w.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys, values = cache.k[index], cache.v[index]
        keys[slots, :, positions] = k
        values[slots, :, positions] = v
        attended = torch.empty(count, q_size, dtype=q.dtype, device=q.device)
        if decode:
            # Grouped-query attention without repeating K/V: (D, kv, g, hd) @ (D, kv, hd, L).
            grouped = q[:decode].view(decode, w.n_kv_heads, per_group, w.head_dim)
            k_view, v_view = keys[:decode, :, :longest], values[:decode, :, :longest]
            scores = torch.matmul(grouped, k_view.transpose(-1, -2)).float() * scale + bias
            weights_ = torch.softmax(scores, dim=-1).to(v_view.dtype)
            attended[:decode] = torch.matmul(weights_, v_view).reshape(decode, q_size)
        for seg, mask in zip(segments, masks, strict=True):
            rows = slice(seg.offset, seg.offset + seg.length)
            end = seg.start + seg.length
            k_seg = keys[seg.slot, :, :end].repeat_interleave(per_group, dim=0)  # (heads, L, hd)
            v_seg = values[seg.slot, :, :end].repeat_interleave(per_group, dim=0)
            out = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k_seg, v_seg, mask)
            attended[rows] = out.transpose(0, 1).reshape(seg.length, q_size)
        h = h + _project(attended, layer, groups, index, "o")
        x = _rms_norm(h, layer.ln2, w.eps)
        gate_up = _project(x, layer, groups, index, "gate_up")
        mixed = w.act(gate_up[:, : w.intermediate]) * gate_up[:, w.intermediate :]
        h = h + _project(mixed, layer, groups, index, "down")
    return _rms_norm(h, w.norm, w.eps)


def _nucleus(scaled: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of logits / T (B, V): candidate token ids (B, K) and their probabilities under
    softmax cut to the top_p nucleus and renormalised (0 outside it).

    TopPLogitsWarper drops a token when it and every less likely token hold at most 1 - top_p
    of the mass; equivalently it keeps a token when the tokens more likely than it hold less
    than top_p. So when the K most likely tokens hold at least top_p, no token outside them is
    kept and the top-K is exact; rows where they do not fall back to the whole vocabulary."""
    probs = torch.softmax(scaled.float(), dim=-1)
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    top, ids = torch.topk(probs, k, dim=-1)
    if bool((top.sum(-1) < top_p).any()):
        top, ids = torch.sort(probs, dim=-1, descending=True)
    before = top.cumsum(-1) - top  # mass of the tokens more likely than each
    keep = before < top_p[:, None]
    keep[:, 0] = True
    kept = top * keep
    return ids, kept / kept.sum(-1, keepdim=True)


# -- scheduling -----------------------------------------------------------------------------


@dataclass
class _Request:
    prompt: list[int]
    arm: str
    params: DecodeParams
    deadline: float | None
    future: Future[list[Sample]]
    generator: torch.Generator | None = None
    samples: list[Sample | None] = field(default_factory=list)


@dataclass
class _Row:
    request: _Request
    index: int  # which of the request's n samples
    position: int  # where the pending token goes
    pending: int  # the last sampled token, not yet in the cache
    tokens: list[int]
    logprobs: list[float]
    hidden: list[Tensor] = field(default_factory=list)  # with params.trace
    nuclei: list[Tensor] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


# What score_many() takes: (prompt, completion, the nuclei to renormalise over or None).
ScoreItem = tuple[Sequence[int], Sequence[int], Sequence[Tensor] | None]


@dataclass
class _PrefixEntry:
    arm: str
    tokens: list[int]
    k: list[Tensor]  # per layer (kv, len, hd)
    v: list[Tensor]


class PrefixCache:
    """The KV of recent prompts per arm, reused up to the longest common prefix with a new
    prompt. LRU-bounded by total tokens."""

    def __init__(self, budget_tokens: int) -> None:
        self.budget = budget_tokens
        self.entries: OrderedDict[int, _PrefixEntry] = OrderedDict()
        self.tokens = 0
        self._next = 0
        self.hits = 0
        self.reused_tokens = 0

    def longest(self, arm: str, prompt: list[int]) -> tuple[_PrefixEntry | None, int]:
        best, best_length = None, 0
        for key, entry in self.entries.items():
            if entry.arm != arm:
                continue
            length = 0
            limit = min(len(entry.tokens), len(prompt) - 1)  # keep one token to compute logits
            while length < limit and entry.tokens[length] == prompt[length]:
                length += 1
            if length > best_length:
                best, best_length, best_key = entry, length, key
        if best is not None:
            self.entries.move_to_end(best_key)
            self.hits += 1
            self.reused_tokens += best_length
        return best, best_length

    def peek(self, arm: str, prompt: list[int]) -> tuple[_PrefixEntry | None, int]:
        """What `longest` would answer, without counting it as a use."""
        best, best_length = None, 0
        for entry in self.entries.values():
            if entry.arm == arm:
                length = _common_prefix(entry.tokens, prompt[:-1])
                if length > best_length:
                    best, best_length = entry, length
        return best, best_length

    def add(self, entry: _PrefixEntry) -> None:
        if self.budget <= 0 or len(entry.tokens) > self.budget:
            return
        for key, old in list(self.entries.items()):  # an entry this one extends is redundant
            if old.arm == entry.arm and entry.tokens[: len(old.tokens)] == old.tokens:
                self.tokens -= len(old.tokens)
                del self.entries[key]
        self.entries[self._next] = entry
        self._next += 1
        self.tokens += len(entry.tokens)
        while self.tokens > self.budget:
            _, dropped = self.entries.popitem(last=False)
            self.tokens -= len(dropped.tokens)

    def forget(self, arm: str) -> None:
        for key, entry in list(self.entries.items()):
            if entry.arm == arm:
                self.tokens -= len(entry.tokens)
                del self.entries[key]


@dataclass
class EngineStats:
    steps: int = 0
    decode_rows: int = 0
    prefill_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    scored_tokens: int = 0  # tokens score() ran forward (teacher forcing)
    logit_rows: int = 0  # final states projected onto the vocabulary, by steps and score()

    @property
    def mean_batch(self) -> float:
        return self.decode_rows / self.steps if self.steps else 0.0


class DecodeEngine:
    """Continuous-batching generation over one base model and named LoRA arms.

    A worker thread owns the model: between two decode steps it admits waiting requests into
    free rows (prefilling what the prefix cache does not hold), then advances every running row
    by one token. Requests come from any thread (`submit` returns a Future)."""

    def __init__(
        self,
        model: Any,
        *,
        end_token_ids: Sequence[int],
        max_batch: int = 16,
        max_positions: int = 2048,
        prefix_cache_tokens: int = 4096,
        prefill_budget: int = 512,
        threads: int | None = None,
    ) -> None:
        self.weights = LlamaWeights.from_model(model, max_positions)
        self.device = self.weights.embed.device
        self.end_ids = torch.tensor(sorted(set(end_token_ids)), device=self.device)
        self.max_batch = max_batch
        self.prefill_budget = prefill_budget  # prompt tokens a step prefills beside decoding
        self.cache = KvCache(self.weights, max_batch)
        self.weights.pack(max_batch)
        head = self.weights.lm_head
        self._packed_head = pack_weight(head, max_batch) if onednn_usable(head) else None
        self.prefix = PrefixCache(prefix_cache_tokens)
        self.stats = EngineStats()
        self._arms: dict[str, LoraArm] = {"": LoraArm.none(self.weights)}
        self._threads = threads
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._waiting: list[_Request] = []
        self._rows: list[_Row] = []
        self._admitted: list[_Request] = []  # taken from _waiting by the step now running
        self._lock = threading.Lock()  # arms and the model, against the worker
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
        self._worker.start()

    # -- arms -----------------------------------------------------------------------------

    def set_arm(self, name: str, arm: LoraArm) -> None:
        """Add or replace an arm. A replaced arm's cached prefixes are dropped; rows running
        under the old weights finish with the new ones (callers swap between requests)."""
        with self._lock:
            self._arms[name] = arm
            self.prefix.forget(name)

    def load_arm(self, name: str, path: str | Path) -> None:
        self.set_arm(name, LoraArm.from_dir(self.weights, path))

    def remove_arm(self, name: str) -> None:
        with self._lock:
            self._arms.pop(name, None)
            self.prefix.forget(name)

    @property
    def arms(self) -> list[str]:
        return sorted(name for name in self._arms if name)

    # -- requests -------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        arm: str,
        params: DecodeParams,
        *,
        deadline: float | None = None,
    ) -> Future[list[Sample]]:
        """Queue a request; its Future gives n samples, or raises EngineTimeout past deadline
        (time.monotonic()), KeyError for an unknown arm, ValueError for a prompt too long."""
        if self._closed:
            raise EngineClosed("the decode engine is shut down")
        if arm not in self._arms:
            raise KeyError(f"no arm named {arm!r}")
        if not prompt:
            raise ValueError("an empty prompt")
        if len(prompt) + params.max_new_tokens > self.weights.max_positions:
            raise ValueError(
                f"{len(prompt)} prompt + {params.max_new_tokens} new tokens exceed "
                f"{self.weights.max_positions} positions"
            )
        if params.n > self.max_batch:
            raise ValueError(f"n = {params.n} exceeds the batch of {self.max_batch} rows")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = _Request(list(prompt), arm, params, deadline, Future(), generator)
        request.samples = [None] * params.n
        self._queue.put(request)
        return request.future

    def generate(
        self, prompt: Sequence[int], arm: str, params: DecodeParams, timeout: float | None = None
    ) -> list[Sample]:
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.submit(prompt, arm, params, deadline=deadline).result()

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=10)

    # -- teacher forcing (what a trainer checks served log-probs against) -----------------

    def score(
        self,
        prompt: Sequence[int],
        completion: Sequence[int],
        arm: str,
        temperature: float,
        top_p: float = 1.0,
        nuclei: Sequence[Tensor] | None = None,
    ) -> list[float]:
        """Log-probs of completion's tokens after prompt under arm, as sampling would log them
        (T = 0: softmax(logits)); with nuclei (kept ids per token, e.g. another arm's Trace),
        renormalised over those instead of this arm's own top_p nucleus. Runs on the caller's
        thread between two decode steps, in a free row of the cache, reusing the prompt's
        cached prefix."""
        return self.score_many([(prompt, completion, nuclei)], arm, temperature, top_p)[0]

    def score_many(
        self,
        items: Sequence[ScoreItem],
        arm: str,
        temperature: float,
        top_p: float = 1.0,
    ) -> list[list[float]]:
        """`score` for several (prompt, completion, nuclei) at once: one forward pass over all
        of them (each in its own free row, reusing its cached prefix), so every weight matrix
        is read once for all their tokens. An item that would reuse at least DEFER_TOKENS more
        of an earlier item's prompt than the cache holds (states of one conversation) waits for
        a second pass that does. Needs a free row per item."""
        out: list[list[float]] = [[] for _ in items]
        pending = [(i, item) for i, item in enumerate(items) if item[1]]
        with self._lock, torch.inference_mode():
            if len(self._rows) + len(pending) > self.max_batch:
                raise RuntimeError(
                    f"score_many() needs {len(pending)} free rows; "
                    f"{self.max_batch - len(self._rows)} are free"
                )
            while pending:
                wave: list[tuple[int, ScoreItem]] = []
                later: list[tuple[int, ScoreItem]] = []
                for index, item in pending:
                    prompt = list(item[0])
                    _, reused = self.prefix.peek(arm, prompt)
                    if any(
                        _common_prefix(prompt, list(other[0])) - reused >= DEFER_TOKENS
                        for _, other in wave
                    ):
                        later.append((index, item))
                    else:
                        wave.append((index, item))
                for index, values in zip(
                    [i for i, _ in wave], self._score_wave([it for _, it in wave], arm), strict=True
                ):
                    _, completion, nuclei = items[index]
                    out[index] = self._completion_logprobs(
                        values, list(completion), temperature, top_p, nuclei
                    )
                pending = later
            return out

    def _score_wave(
        self,
        items: Sequence[ScoreItem],
        arm: str,
    ) -> list[Tensor]:
        """One forward pass over items (free rows from the first free one on): each item's
        logits (C, V) that predict its completion."""
        w, first = self.weights, len(self._rows)
        tokens: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        segments: list[Segment] = []
        for slot, (prompt, completion, _) in enumerate(items, start=first):
            sequence = list(prompt) + list(completion)
            entry, reused = self.prefix.longest(arm, sequence[: len(prompt)])
            self.cache.ensure(len(sequence))
            if entry is not None:
                for layer in range(len(w.layers)):
                    self.cache.k[layer][slot, :, :reused] = entry.k[layer][:, :reused]
                    self.cache.v[layer][slot, :, :reused] = entry.v[layer][:, :reused]
            run = sequence[reused:-1]
            segments.append(Segment(slot, reused, len(tokens), len(run)))
            tokens.extend(run)
            slots.extend([slot] * len(run))
            positions.extend(range(reused, reused + len(run)))
        hidden = forward_tokens(
            w,
            self.cache,
            torch.tensor(tokens, device=self.device),
            torch.tensor(slots, device=self.device),
            torch.tensor(positions, device=self.device),
            0,
            segments,
            _Groups([(self._arms[arm], None)]),
        )
        picks: list[int] = []
        for segment, (prompt, completion, _) in zip(segments, items, strict=True):
            self._remember(arm, list(prompt), segment.slot)
            start = segment.offset + len(prompt) - 1 - segment.start
            picks.extend(range(start, start + len(completion)))
        self.stats.scored_tokens += len(tokens)
        self.stats.logit_rows += len(picks)
        logits = self.logits(hidden[torch.tensor(picks, device=self.device)])
        out, offset = [], 0
        for _, completion, _ in items:
            out.append(logits[offset : offset + len(completion)])
            offset += len(completion)
        return out

    def _completion_logprobs(
        self,
        logits: Tensor,
        completion: list[int],
        temperature: float,
        top_p: float,
        nuclei: Sequence[Tensor] | None,
    ) -> list[float]:
        """Each completion token's log-prob under its row of logits (C, V), as `score` says."""
        targets = torch.tensor(completion, device=self.device)
        if temperature == 0:
            greedy = torch.log_softmax(logits, dim=-1)
            return [float(v) for v in greedy.gather(-1, targets[:, None])[:, 0]]
        scaled = logits / temperature
        if nuclei is not None:
            # Renormalised over each position's kept ids: the rest masked out of the softmax.
            kept = torch.zeros(scaled.shape, dtype=torch.bool, device=self.device)
            for position, ids in enumerate(nuclei):
                kept[position, ids.to(self.device)] = True
            restricted = torch.log_softmax(scaled.masked_fill(~kept, float("-inf")), dim=-1)
            return [float(v) for v in restricted.gather(-1, targets[:, None])[:, 0]]
        if top_p >= 1.0:
            full = torch.log_softmax(scaled, dim=-1)
            return [float(v) for v in full.gather(-1, targets[:, None])[:, 0]]
        out = []
        for position, target in enumerate(completion):
            ids_, probs = _nucleus(
                scaled[position : position + 1], torch.tensor([top_p], device=self.device)
            )
            where = (ids_[0] == target).nonzero()
            out.append(float(torch.log(probs[0, where[0, 0]])) if len(where) else float("-inf"))
        return out

    def _remember(self, arm: str, prompt: list[int], slot: int) -> None:
        """Offer slot's K/V of prompt to the prefix cache."""
        layers = range(len(self.weights.layers))
        self.prefix.add(
            _PrefixEntry(
                arm,
                prompt,
                [self.cache.k[layer][slot, :, : len(prompt)].clone() for layer in layers],
                [self.cache.v[layer][slot, :, : len(prompt)].clone() for layer in layers],
            )
        )

    # -- the worker -----------------------------------------------------------------------

    def _loop(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        while True:
            try:
                block = not self._rows and not self._waiting
                while True:
                    item = self._queue.get(block=block)
                    if item is None:
                        self._fail_all(EngineClosed("the decode engine is shut down"))
                        return
                    self._waiting.append(item)
                    block = False
            except queue.Empty:
                pass
            try:
                with self._lock, torch.inference_mode():
                    self._step()
            except Exception as exc:  # report to every request in flight, keep serving
                log.exception("decode step failed")
                self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for request in {id(r.request): r.request for r in self._rows}.values():
            if not request.future.done():
                request.future.set_exception(exc)
        for request in [*self._admitted, *self._waiting]:
            if not request.future.done():
                request.future.set_exception(exc)
        self._rows, self._waiting, self._admitted = [], [], []

    def _expired(self, request: _Request, now: float) -> bool:
        if request.deadline is not None and now > request.deadline:
            if not request.future.done():
                request.future.set_exception(
                    EngineTimeout("the request's deadline passed before it finished")
                )
            return True
        return request.future.done()  # failed or cancelled: nothing more to do

    def _admit(self) -> list[tuple[_Request, int, int]]:
        """Take waiting requests into free rows, up to prefill_budget prompt tokens a step
        (at least one request): copy each one's cached prefix into its first row and return
        (request, first row, reused tokens) for the step to prefill the rest."""
        now = time.monotonic()
        still: list[_Request] = []
        admitted: list[tuple[_Request, int, int]] = []
        rows, budget = len(self._rows), self.prefill_budget
        for request in self._waiting:
            if self._expired(request, now):
                continue
            if request.arm not in self._arms:
                request.future.set_exception(KeyError(f"no arm named {request.arm!r}"))
                continue
            if rows + request.params.n > self.max_batch or (admitted and budget <= 0):
                still.append(request)
                continue
            entry, reused = self.prefix.longest(request.arm, request.prompt)
            if self._shares_with(request, admitted, reused):
                # Next step it reuses what this step prefills. Only a request older than it
                # defers it, and the oldest always goes in: everyone's turn comes.
                still.append(request)
                continue
            self.cache.ensure(len(request.prompt) + request.params.max_new_tokens)
            if entry is not None:
                for layer in range(len(self.weights.layers)):
                    self.cache.k[layer][rows, :, :reused] = entry.k[layer][:, :reused]
                    self.cache.v[layer][rows, :, :reused] = entry.v[layer][:, :reused]
            admitted.append((request, rows, reused))
            rows += request.params.n
            budget -= len(request.prompt) - reused
        self._waiting = still
        self._admitted = [request for request, _, _ in admitted]
        return admitted

    def _shares_with(
        self, request: _Request, admitted: list[tuple[_Request, int, int]], reused: int
    ) -> bool:
        """Whether a request admitted this step would hand `request` at least DEFER_TOKENS
        more of its prompt than the prefix cache holds (a burst of one business's requests,
        PPO's batch under one system prompt): prefilled once, reused from the next step on."""
        if self.prefix.budget <= 0:
            return False
        for other, _, _ in admitted:
            if other.arm != request.arm or len(other.prompt) > self.prefix.budget:
                continue
            limit = min(len(other.prompt), len(request.prompt) - 1)
            shared = 0
            while shared < limit and other.prompt[shared] == request.prompt[shared]:
                shared += 1
            if shared - reused >= DEFER_TOKENS:
                return True
        return False

    def _step(self) -> None:
        """One forward pass: a token for every running row and the prompts of the requests
        admitted now; then sample the next token of each."""
        w = self.weights
        admitted = self._admit()
        decode = len(self._rows)
        if not decode and not admitted:
            return
        tokens = [r.pending for r in self._rows]
        slots = list(range(decode))
        positions = [r.position for r in self._rows]
        arms = [r.request.arm for r in self._rows]
        segments = []
        for request, first, reused in admitted:
            suffix = request.prompt[reused:]
            segments.append(Segment(first, reused, len(tokens), len(suffix)))
            tokens.extend(suffix)
            slots.extend([first] * len(suffix))
            positions.extend(range(reused, len(request.prompt)))
            arms.extend([request.arm] * len(suffix))
            self.stats.prefill_tokens += len(suffix)
            self.stats.reused_tokens += reused
        by_arm: dict[str, list[int]] = {}
        for i, name in enumerate(arms):
            by_arm.setdefault(name, []).append(i)
        parts = [
            (
                self._arms[name],
                None if len(members) == len(arms) else torch.tensor(members, device=self.device),
            )
            for name, members in by_arm.items()
        ]
        hidden = forward_tokens(
            w,
            self.cache,
            torch.tensor(tokens, device=self.device),
            torch.tensor(slots, device=self.device),
            torch.tensor(positions, device=self.device),
            decode,
            segments,
            _Groups(parts),
        )
        for r in self._rows:
            r.position += 1
        if decode:
            self.stats.steps += 1
            self.stats.decode_rows += decode
        picks = list(range(decode))
        for (request, first, _), segment in zip(admitted, segments, strict=True):
            length = len(request.prompt)
            self._remember(request.arm, list(request.prompt), first)
            for index in range(request.params.n):
                if index:
                    self.cache.move(first, first + index, length)
                self._rows.append(_Row(request, index, length, -1, [], []))
                picks.append(segment.offset + segment.length - 1)
        chosen = hidden[torch.tensor(picks, device=self.device)]
        self.stats.logit_rows += len(picks)
        self._sample(list(self._rows), self.logits(chosen), chosen)

    def logits(self, hidden: Tensor) -> Tensor:
        """lm_head over final hidden states (B, H) -> float32 (B, V). On a CPU in float32 it
        runs as a oneDNN linear (the weight converted once): the vocabulary projection is the
        largest matrix, and MKL's matmul took 2-3x longer over it (41 vs 15 ms at B = 16)."""
        return _linear(hidden, self.weights.lm_head, None, self._packed_head).float()

    def _sample(self, rows: list[_Row], logits: Tensor, hidden: Tensor) -> None:
        """Draw each row's next token from logits (B, V) (hidden (B, H) predicted them), record
        it, and retire rows that are done."""
        temperature = [r.request.params.temperature for r in rows]
        chosen = torch.empty(len(rows), dtype=torch.long, device=self.device)
        logprob = torch.empty(len(rows), dtype=torch.float32, device=self.device)
        greedy = [i for i, t in enumerate(temperature) if t == 0]
        sampled = [i for i, t in enumerate(temperature) if t > 0]
        if greedy:
            index = torch.tensor(greedy, device=self.device)
            part = torch.log_softmax(logits.index_select(0, index), dim=-1)
            best = part.argmax(-1)
            chosen[index] = best
            logprob[index] = part.gather(-1, best[:, None])[:, 0]
            for j, i in enumerate(greedy):
                if rows[i].request.params.trace:
                    p = part[j].exp()
                    rows[i].entropy.append(float(-(p * part[j]).nansum()))
        # top_p = 1 draws from the whole softmax (transformers adds no top-p warper then);
        # top_p < 1 from the nucleus.
        whole = [i for i in sampled if rows[i].request.params.top_p >= 1.0]
        cut = [i for i in sampled if rows[i].request.params.top_p < 1.0]
        for members in (whole, cut):
            if not members:
                continue
            index = torch.tensor(members, device=self.device)
            temps = torch.tensor([temperature[i] for i in members], device=self.device)
            scaled = logits.index_select(0, index) / temps[:, None]
            if members is whole:
                probs = torch.softmax(scaled, dim=-1)
                ids = torch.arange(probs.shape[-1], device=self.device).expand(len(members), -1)
            else:
                top_p = torch.tensor(
                    [rows[i].request.params.top_p for i in members], device=self.device
                )
                ids, probs = _nucleus(scaled, top_p)
            # The exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability
            # p_i, in one pass (torch.multinomial over a whole vocabulary took 21 ms at B = 16).
            race = torch.empty_like(probs)
            free = [j for j, i in enumerate(members) if rows[i].request.generator is None]
            if len(free) == len(members):
                race.exponential_()
            else:
                for j, i in enumerate(members):
                    generator = rows[i].request.generator
                    if generator is None:
                        race[j].exponential_()
                    else:
                        race[j].exponential_(generator=generator)
            # A uniform draw of exactly 0 gives E = 0 (about once per 16M draws): clamped, so
            # that a token outside the nucleus (p = 0) never wins by 0 / 0.
            picks = (probs / race.clamp_(min=1e-30)).argmax(dim=-1)
            for j, i in enumerate(members):
                if rows[i].request.params.trace:
                    kept = probs[j] > 0
                    p = probs[j][kept]
                    rows[i].entropy.append(float(-(p * p.log()).sum()))
                    if members is cut:
                        rows[i].nuclei.append(ids[j][kept].clone())
            chosen[index] = ids.gather(-1, picks[:, None])[:, 0]
            logprob[index] = torch.log(probs.gather(-1, picks[:, None])[:, 0])
        is_end = torch.isin(chosen, self.end_ids).tolist()
        chosen_list, logprob_list = chosen.tolist(), logprob.tolist()
        done: list[_Row] = []
        for i, (r, token, lp, end) in enumerate(
            zip(rows, chosen_list, logprob_list, is_end, strict=True)
        ):
            r.tokens.append(token)
            r.logprobs.append(lp)
            r.pending = token
            if r.request.params.trace:
                r.hidden.append(hidden[i].clone())
            self.stats.generated_tokens += 1
            if end or len(r.tokens) >= r.request.params.max_new_tokens:
                r.request.samples[r.index] = self._finished(r, "stop" if end else "length")
                done.append(r)
        if done:
            self._retire(done)
        now = time.monotonic()
        expired = [r for r in self._rows if self._expired(r.request, now)]
        if expired:
            self._retire(expired)

    @staticmethod
    def _finished(row: _Row, finish: str) -> Sample:
        trace = None
        if row.request.params.trace:
            params = row.request.params
            whole = params.temperature == 0 or params.top_p >= 1.0
            trace = Trace(torch.stack(row.hidden), None if whole else row.nuclei, row.entropy)
        return Sample(row.tokens, float(sum(row.logprobs)), row.logprobs, finish, trace)

    def _retire(self, finished: list[_Row]) -> None:
        """Drop finished rows, moving the last rows into their slots (rows stay compact)."""
        gone = {id(r) for r in finished}
        for r in finished:
            request = r.request
            if not request.future.done() and all(s is not None for s in request.samples):
                request.future.set_result([s for s in request.samples if s is not None])
        keep: list[_Row] = []
        for slot, r in enumerate(self._rows):
            if id(r) in gone:
                continue
            target = len(keep)
            if target != slot:
                self.cache.move(slot, target, r.position)
            keep.append(r)
        self._rows = keep
