"""Token-level PPO for the policy-improvement step of Iterative PPO, readable top to bottom.

Single-turn RL: each prompt is a logged conversation state, the action is the whole sampled
business reply, and Q^pi(s, a) (`reward_fn`) scores it once. Per reply token t:

    r_t = -beta * (log pi(a_t | s_t) - log pi_i(a_t | s_t)),  plus Q(s, a) at the last token,

advantages by GAE(gamma_tok, lam) on a value head, the clipped surrogate and the clipped value
loss, a few epochs of minibatches per rollout (Schulman et al. 2017; Ziegler et al. 2019). The
layout follows CleanRL's ppo.py; the tensor helpers are pure functions tested against loops.

Policy and reference (see improve.py): pi_{i+1} is the parent adapter trained further, saved
as one adapter on the base. The reference pi_i is a frozen copy of the parent adapter, loaded
as adapter "reference" on the same base weights and selected per row with peft's
`adapter_names`, so no second model is held in memory and no adapter state is switched.

Value head: a linear layer on the policy's final hidden state (a shared trunk). One forward
pass yields both log-probs and values, half the cost of a separate critic model, which matters
on CPU; the price is that the value loss also moves the LoRA weights, bounded by vf_coef. The
head starts at zero for each improvement (Q changes every iteration) and is not saved.

Rollouts come from the serving engine (workers/learning/engine.py, `rollout_engine="fast"`): the
policy's adapter is copied into it after every update, it samples with the config's T and top_p
and hands back, per token, the log-prob, the nucleus and the final hidden state it used, and it
scores the replies under pi_i, so no scoring pass of the trainer's model is needed. After each
sync a fixed probe reply (after only the last PROBE_PROMPT_TOKENS of its prompt) is scored by
both, and so is every reply of the update's first minibatch (full prompts: the trainer computes
those log-probs anyway, before its first step); a difference
above `logprob_tolerance` stops PPO (`LogprobMismatch`): peers shipped silent LoRA-sync bugs for
months (verl #7495, OpenRLHF #1349). `rollout_engine="transformers"` samples with generate()
and scores with the trainer.

The trainer's forward passes pack each minibatch into one sequence that holds every shared
prefix once (`pack_rows`: a prefix tree under a tree attention mask), which is exact and, on
the demo's states (a 66-token system prompt, conversations that extend each other), computes
about half the tokens that left-padded rows did.

Sampling and scoring are one distribution. Everything runs in eval mode (dropout off); the
base's generation_config.json is set aside and every sampling option pinned (improve.py,
`NEUTRAL_GENERATION`), so the sampler draws from softmax(logits / T) cut to the top_p nucleus,
as the embedded server does. Log-probs use the same temperature and, when top_p < 1, the same
nucleus: taken from the policy's logits at rollout time and then kept fixed per token for the
rollout, updated and reference log-probs alike, each renormalised over it, so every ratio and
KL is between distributions on the same support and finite.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workers.learning.chat import ChatMessage
from workers.learning.configs import PPOConfig
from workers.learning.engine import (
    DecodeEngine,
    DecodeParams,
    EngineStats,
    LoraArm,
    UnsupportedModel,
)
from workers.learning.policy_model import (
    NEUTRAL_GENERATION,
    POLICY_ADAPTER,
    ProgressFn,
    RewardFn,
    checked_rewards,
    end_token_ids,
    load_policy,
    load_tokenizer,
    resolve_device,
    save_policy,
)
from workers.learning.tree_attention import (
    TreeSegment,
    enable_tree_attention,
    tree_segments,
    uses_tree_attention,
)

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"


# -- pure tensor helpers ----------------------------------------------------------------------


# The probe's prompt: its last tokens only. It checks that the engine runs the weights the
# trainer holds, which any input shows; the first minibatch's rows check the full prompts.
PROBE_PROMPT_TOKENS = 32


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of values where mask is 1, over everything or along dim."""
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Population variance of values where mask is 1."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """values scaled to unit variance over the masked entries (and centred, if shift_mean)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns (advantages + values), both (B, T).

    mask is 1 on each row's reply tokens and 0 on the right padding after them; the state after
    a row's last token is terminal (value 0). Padded positions come back as 0.
    """
    steps = rewards.shape[1]
    running = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(steps)):
        # Padding after the last token means the episode ended: no bootstrap, no carry.
        next_mask = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_mask * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate: (loss, fraction of tokens clipped, approx KL(old || new))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    # The k3 estimator (Schulman): unbiased and never negative, as in CleanRL.
    approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss 0.5 * max(unclipped, clipped squared error): (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(
        values - old_values, -cliprange_value, cliprange_value
    )
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clipfrac.detach()


def nucleus_mask(logits: Tensor, top_p: float) -> Tensor:
    """The tokens nucleus (top-p) sampling may draw from each distribution: (..., V) -> bool.

    The most likely tokens, in order, until their probability reaches top_p; always at least
    one. As transformers' TopPLogitsWarper (which the sampler runs after the temperature, so
    pass logits / T): a token is dropped when it and the tokens less likely than it hold at
    most 1 - top_p of the mass.
    """
    if top_p >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    mass_up_to = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_up_to <= 1.0 - top_p
    drop_sorted[..., -1] = False  # the most likely token always stays
    return ~drop_sorted.scatter(-1, order, drop_sorted)


def _restricted(logits: Tensor, nucleus: Tensor | None) -> Tensor:
    """logits with the tokens outside the nucleus made impossible (finite, so that entropy's
    0 * logit stays 0 rather than NaN)."""
    if nucleus is None:
        return logits
    return logits.masked_fill(~nucleus, torch.finfo(logits.dtype).min)


def logprobs_of(logits: Tensor, tokens: Tensor, nucleus: Tensor | None = None) -> Tensor:
    """Log-probability of each token under its logits: (B, T, V), (B, T) -> (B, T); with a
    nucleus (B, T, V), under the distribution renormalised over it."""
    log_probs = torch.log_softmax(_restricted(logits, nucleus), dim=-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: Tensor, nucleus: Tensor | None = None) -> Tensor:
    """Entropy of each position's distribution (renormalised over the nucleus, if given):
    (B, T, V) -> (B, T)."""
    logits = _restricted(logits, nucleus)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def reply_token_mask(replies: Tensor, end_ids: Sequence[int]) -> Tensor:
    """1.0 on each reply's tokens up to and including its first end token, 0.0 after it; a
    reply with no end token (cut at max_new_tokens) is all ones: (B, C) -> (B, C) float."""
    is_end = torch.isin(replies, torch.tensor(list(end_ids), device=replies.device)).long()
    ended_before = (is_end.cumsum(dim=1) - is_end) > 0
    return (~ended_before).float()


def token_rewards(score: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards (B, C): -beta * kl on every reply token, plus each reply's score (B,)
    at its last reply token (the end token, or the last one generated when it was cut)."""
    rewards = -beta * kl * mask
    last = mask.sum(dim=1).long() - 1
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += score
    return rewards


# -- model pieces -----------------------------------------------------------------------------


class ValueHead(nn.Module):
    """V(s_t) from the policy's final hidden state; starts at zero."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden).squeeze(-1)


@dataclass
class Rollout:
    """Sampled replies: left-padded prompts, then replies padded on the right."""

    input_ids: Tensor  # (B, P + C)
    attention_mask: Tensor  # (B, P + C)
    reply_mask: Tensor  # (B, C) float: 1 on reply tokens up to and including the end token
    prompt_length: int  # P
    texts: list[str]

    def to(self, device: Any) -> Rollout:
        return Rollout(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.reply_mask.to(device),
            self.prompt_length,
            self.texts,
        )


def sample_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[ChatMessage]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> Rollout:
    """Sample one reply per prompt from the model's active adapter, as the suggestion API would
    render the prompt (the chat template with the generation prompt).

    Every sampling option a call can pin is pinned; those it can only leave unset (min_p, ...)
    come from the model's generation_config, which `load_policy` makes neutral.
    """
    from transformers import GenerationConfig

    texts = [
        tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
        )
        for messages in prompts
    ]
    device = next(model.parameters()).device
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    encoded = encoded.to(device)
    end_ids = end_token_ids(model, tokenizer)
    generation = GenerationConfig(
        **NEUTRAL_GENERATION,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,  # transformers would otherwise apply top_k=50: not the distribution we score
        eos_token_id=end_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.no_grad():
        sequences = model.generate(**encoded, generation_config=generation)
    prompt_length = int(encoded["input_ids"].shape[1])
    replies = sequences[:, prompt_length:]
    # A reply cut at max_new_tokens keeps all its tokens and is scored as written.
    reply_mask = reply_token_mask(replies, end_ids)
    lengths = reply_mask.sum(dim=1).long().tolist()
    reply_texts = [
        str(tokenizer.decode(row[:length], skip_special_tokens=True))
        for row, length in zip(replies.tolist(), lengths, strict=True)
    ]
    attention_mask = torch.cat([encoded["attention_mask"], reply_mask.long()], dim=1)
    return Rollout(sequences, attention_mask, reply_mask, prompt_length, reply_texts)


def reply_logits(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_length: int,
    temperature: float,
    adapter: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The logits / T that predict each reply token (B, C, V) and the final hidden state of the
    state before each reply token (B, C, H). adapter picks a peft adapter per row."""
    reply_length = input_ids.shape[1] - prompt_length
    extra = {"adapter_names": [adapter] * input_ids.shape[0]} if adapter else {}
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        output_hidden_states=True,
        logits_to_keep=reply_length + 1,  # only the logits that predict reply tokens
        **extra,
    )
    hidden = output.hidden_states[-1][:, prompt_length - 1 : -1]
    return output.logits[:, :-1] / temperature, hidden


@dataclass
class PackedRows:
    """Rows packed into one sequence holding each distinct prefix once (a prefix tree).

    A token attends to itself and its ancestors only and sits at its depth, so every row is
    computed exactly as alone; a prefix that rows share (the system prompt, the earlier turns of
    one conversation) is computed, and back-propagated, once instead of once per row, and no
    padding is computed at all. Only the tokens whose states predict a reply token are needed:
    each row's prompt and its reply but the last token.
    """

    input_ids: Tensor  # (1, N)
    position_ids: Tensor  # (1, N): each token's depth in its row
    attention_mask: Tensor  # (1, 1, N, N) additive: 0 on a token's ancestors and itself
    before: Tensor  # (B, C) long: packed index of the token before each reply token
    keep: Tensor  # (K,) the distinct packed indices in `before`, ascending
    keep_index: Tensor  # (B, C) long: each entry of `before` as an index into keep
    targets: Tensor  # (B, C) the reply tokens (0 after each row's reply)
    mask: Tensor  # (B, C) float: 1 on each row's reply tokens
    segments: list[TreeSegment]  # each row's run of new tokens, for tree attention

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


def pack_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    width: int | None = None,
    device: Any = "cpu",
) -> PackedRows:
    """Pack (prompt, reply) token rows (each with a non-empty prompt) into a prefix tree; the
    per-reply-token tensors are `width` wide (default: the longest reply)."""
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    width = max(len(reply) for _, reply in rows) if width is None else width
    before = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    paths = []
    for row, (prompt, reply) in enumerate(rows):
        if not prompt:
            raise ValueError("every packed row needs a prompt")
        sequence = [*prompt, *reply[:-1]]  # the last reply token predicts nothing
        node = -1
        path = []
        for depth, token in enumerate(sequence):
            key = (node, int(token))
            if key not in index:
                index[key] = len(tokens)
                tokens.append(int(token))
                parents.append(node)
                depths.append(depth)
            node = index[key]
            path.append(node)
        paths.append(path)
        n = len(reply)
        before[row, :n] = torch.tensor(path[len(prompt) - 1 : len(prompt) - 1 + n])
        targets[row, :n] = torch.tensor([int(t) for t in reply])
        mask[row, :n] = 1.0
    size = len(tokens)
    sees = torch.zeros((size, size), dtype=torch.bool)
    for node, parent in enumerate(parents):  # parents come before their children
        if parent >= 0:
            sees[node] = sees[parent]
        sees[node, node] = True
    attention = torch.zeros((size, size)).masked_fill(~sees, torch.finfo(torch.float32).min)
    valid = mask.bool()
    keep = torch.unique(before[valid])  # sorted
    keep_index = torch.searchsorted(keep, before).clamp(max=len(keep) - 1)
    return PackedRows(
        torch.tensor([tokens], device=device),
        torch.tensor([depths], device=device),
        attention[None, None].to(device),
        before.to(device),
        keep.to(device),
        keep_index.to(device),
        targets.to(device),
        mask.to(device),
        tree_segments(paths, device),
    )


def rollout_rows(rollout: Rollout, rows: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """The (prompt, reply) tokens of the rollout's rows, without padding."""
    out = []
    prompt_length = rollout.prompt_length
    for row in rows:
        seen = rollout.attention_mask[row, :prompt_length].bool()
        prompt = rollout.input_ids[row, :prompt_length][seen]
        n = int(rollout.reply_mask[row].sum().item())
        reply = rollout.input_ids[row, prompt_length : prompt_length + n]
        out.append((prompt.tolist(), reply.tolist()))
    return out


def packed_reply_logits(
    model: Any,
    packed: PackedRows,
    temperature: float,
    adapter: str | None = None,
    vocabulary: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """reply_logits for packed rows: the logits / T that predict each reply token (B, C, V) and
    the final hidden state before it (B, C, H); entries after a row's reply are filler. With
    `vocabulary` (U,) ascending token ids, only those columns of the logits (B, C, U)."""
    extra: dict[str, Any] = {"adapter_names": [adapter]} if adapter else {}
    if uses_tree_attention(model):  # only the blocks the tree mask keeps
        extra["tree_segments"] = packed.segments
        attention_mask = None
    else:
        attention_mask = packed.attention_mask
    keep = packed.keep if vocabulary is None else packed.keep[:0]
    output = model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=keep,  # only the states that predict reply tokens
        **extra,
    )
    hidden = output.hidden_states[-1][0][packed.before]  # after the final norm
    if vocabulary is None:
        return output.logits[0][packed.keep_index] / temperature, hidden
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias[vocabulary]
    return nn.functional.linear(hidden, head.weight[vocabulary], bias) / temperature, hidden


def _plain_output_head(model: Any) -> bool:
    """Whether the vocabulary projection is a plain linear layer (no adapter on it), so that a
    few of its rows give exactly those logits."""
    head = model.get_output_embeddings()
    return type(head) is nn.Linear


def reply_forward(
    model: Any,
    packed: PackedRows,
    temperature: float,
    adapter: str | None = None,
    nucleus: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per reply token of packed rows: log-prob and entropy under the model at temperature T
    (renormalised over nucleus (B, C, V), if given), and the final hidden state of the state
    before it; (B, C) each, (B, C, H), with 0 after each row's reply.

    With a nucleus only the tokens in some reply token's nucleus are projected (the union, a
    fraction of the vocabulary at top_p < 1): outside its nucleus a token's logit never counts.
    """
    targets, vocabulary = packed.targets, None
    if nucleus is not None and _plain_output_head(model):
        vocabulary = nucleus[packed.mask.bool()].any(dim=0).nonzero().flatten()
        targets = torch.searchsorted(vocabulary, targets).clamp(max=len(vocabulary) - 1)
        nucleus = nucleus[..., vocabulary]
    logits, hidden = packed_reply_logits(model, packed, temperature, adapter, vocabulary)
    logprobs = logprobs_of(logits, targets, nucleus) * packed.mask
    with torch.no_grad():
        entropy = entropy_of(logits, nucleus) * packed.mask
    return logprobs, entropy, hidden * packed.mask[..., None]


def score_rollout(
    model: Any,
    value_head: ValueHead,
    rollout: Rollout,
    temperature: float,
    top_p: float,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Log-probs under the policy and under pi_i, values and entropies of the rollout's reply
    tokens, and the nucleus they are renormalised over (None when top_p is 1), without
    gradients, chunk_size rows at a time (bounds activation memory).

    The nucleus is the sampler's: top_p of the policy's logits / T at rollout time. It also
    holds each sampled token, which a recomputation that differs from generate()'s cached one
    in the last bits could otherwise drop at the nucleus' edge (a log-prob of -inf).
    """
    parts: list[tuple[Tensor, ...]] = []
    nuclei: list[Tensor] = []
    device = rollout.input_ids.device
    width = rollout.reply_mask.shape[1]
    with torch.no_grad():
        for start in range(0, rollout.input_ids.shape[0], chunk_size):
            rows = range(start, min(start + chunk_size, rollout.input_ids.shape[0]))
            packed = pack_rows(rollout_rows(rollout, rows), width, device)
            logits, hidden = packed_reply_logits(model, packed, temperature)
            nucleus = None
            if top_p < 1.0:
                nucleus = nucleus_mask(logits, top_p).scatter(-1, packed.targets[..., None], True)
                nuclei.append(nucleus)
            logprobs = logprobs_of(logits, packed.targets, nucleus) * packed.mask
            entropy = entropy_of(logits, nucleus) * packed.mask
            ref_logprobs, _, _ = reply_forward(
                model, packed, temperature, adapter=REFERENCE_ADAPTER, nucleus=nucleus
            )
            parts.append((logprobs, ref_logprobs, value_head(hidden) * packed.mask, entropy))
    logprobs, ref_logprobs, values, entropy = (
        torch.cat(column) for column in zip(*parts, strict=True)
    )
    return logprobs, ref_logprobs, values, entropy, torch.cat(nuclei) if nuclei else None


class LogprobMismatch(RuntimeError):
    """The serving engine's log-probs differ from the trainer's: it is not sampling the policy
    being trained (a stale or wrongly loaded adapter)."""


@dataclass
class ServedRollout:
    """A rollout sampled by the engine, with what score_rollout would otherwise recompute."""

    rollout: Rollout
    prompts: list[list[int]]
    replies: list[list[int]]
    logprobs: Tensor  # (B, C) under the policy, over the nucleus
    ref_logprobs: Tensor  # (B, C) under pi_i, over the same nucleus
    hidden: Tensor  # (B, C, H) the final hidden state before each reply token
    entropy: Tensor  # (B, C)
    nucleus: Tensor | None  # (B, C, V) bool; None when top_p is 1


def peft_engine(
    model: Any, tokenizer: Any, *, max_batch: int, adapters: Sequence[str]
) -> DecodeEngine | None:
    """The serving engine over a PeftModel's base, with the named adapters as arms (None when
    it cannot reproduce the model; the caller then samples with generate())."""
    base = model.get_base_model()
    try:
        engine = DecodeEngine(
            base,
            end_token_ids=end_token_ids(model, tokenizer),
            max_batch=max_batch,
            max_positions=min(int(base.config.max_position_embeddings), 8192),
        )
        for name in adapters:
            engine.set_arm(name, LoraArm.from_peft(engine.weights, model, name))
    except UnsupportedModel as exc:
        log.warning("sampling with generate(): the engine cannot serve this model (%s)", exc)
        return None
    return engine


def rollout_engine(model: Any, tokenizer: Any, config: PPOConfig) -> DecodeEngine | None:
    """PPO's engine, with pi_i as `reference` (None when the config asks for generate())."""
    if config.rollout_engine != "fast":
        return None
    return peft_engine(model, tokenizer, max_batch=config.batch_size, adapters=[REFERENCE_ADAPTER])


def sync_policy(engine: DecodeEngine, model: Any) -> None:
    """Copy the policy adapter's current weights into the engine (after every update)."""
    engine.set_arm(POLICY_ADAPTER, LoraArm.from_peft(engine.weights, model, POLICY_ADAPTER))


def sample_from_engine(
    engine: DecodeEngine,
    tokenizer: Any,
    prompts: Sequence[list[ChatMessage]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    policy_is_reference: bool = False,
) -> ServedRollout:
    """One reply per prompt from the engine's policy arm, laid out as sample_replies lays out
    generate()'s (left-padded prompts, right-padded replies), with the sampler's per-token
    log-probs, nuclei and hidden states, and pi_i's log-probs over the same nuclei (the
    sampler's own where the caller knows the policy still is pi_i: before the first update)."""
    texts = [
        tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
        )
        for messages in prompts
    ]
    prompt_ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    futures = [
        engine.submit(
            ids,
            POLICY_ADAPTER,
            DecodeParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed + row,
                trace=True,
            ),
        )
        for row, ids in enumerate(prompt_ids)
    ]
    samples = [future.result()[0] for future in futures]
    batch = len(samples)
    prompt_length = max(len(ids) for ids in prompt_ids)
    reply_length = max(len(s.tokens) for s in samples)
    hidden_size = int(engine.weights.embed.shape[1])
    vocab = int(engine.weights.lm_head.shape[0])
    pad = tokenizer.pad_token_id
    input_ids = torch.full((batch, prompt_length + reply_length), pad, dtype=torch.long)
    prompt_mask = torch.zeros((batch, prompt_length), dtype=torch.long)
    reply_mask = torch.zeros((batch, reply_length))
    logprobs = torch.zeros((batch, reply_length))
    ref_logprobs = torch.zeros((batch, reply_length))
    entropy = torch.zeros((batch, reply_length))
    hidden = torch.zeros((batch, reply_length, hidden_size))
    nucleus = torch.ones((batch, reply_length, vocab), dtype=torch.bool) if top_p < 1.0 else None
    for row, (ids, sample) in enumerate(zip(prompt_ids, samples, strict=True)):
        assert sample.trace is not None
        n = len(sample.tokens)
        input_ids[row, prompt_length - len(ids) : prompt_length] = torch.tensor(ids)
        prompt_mask[row, prompt_length - len(ids) :] = 1
        input_ids[row, prompt_length : prompt_length + n] = torch.tensor(sample.tokens)
        reply_mask[row, :n] = 1.0
        logprobs[row, :n] = torch.tensor(sample.token_logprobs)
        entropy[row, :n] = torch.tensor(sample.trace.entropy)
        hidden[row, :n] = sample.trace.hidden.float().cpu()
        if nucleus is not None and sample.trace.nucleus is not None:
            for position, kept in enumerate(sample.trace.nucleus):
                nucleus[row, position] = False
                nucleus[row, position, kept.cpu()] = True
    # pi_i's log-probs over the sampler's nuclei: one teacher-forced pass for the whole batch.
    if policy_is_reference:
        ref_logprobs = logprobs.clone()
    else:
        items = [
            (ids, s.tokens, s.trace.nucleus if s.trace else None)
            for ids, s in zip(prompt_ids, samples, strict=True)
        ]
        for row, values in enumerate(engine.score_many(items, REFERENCE_ADAPTER, temperature)):
            ref_logprobs[row, : len(values)] = torch.tensor(values)
    rollout = Rollout(
        input_ids,
        torch.cat([prompt_mask, reply_mask.long()], dim=1),
        reply_mask,
        prompt_length,
        [str(tokenizer.decode(s.tokens, skip_special_tokens=True)) for s in samples],
    )
    return ServedRollout(
        rollout,
        prompt_ids,
        [s.tokens for s in samples],
        logprobs,
        ref_logprobs,
        hidden,
        entropy,
        nucleus,
    )


def check_served_logprobs(
    engine: DecodeEngine,
    model: Any,
    probe: Sequence[tuple[list[int], list[int]]],
    temperature: float,
    tolerance: float,
) -> float:
    """The largest difference of a probe reply's summed log-prob (softmax(logits / T)) between
    the engine's policy arm and the trainer's model; LogprobMismatch above tolerance."""
    device = next(model.parameters()).device
    gaps = []
    for prompt, reply in probe:
        served = sum(engine.score(prompt, reply, POLICY_ADAPTER, temperature))
        with torch.no_grad():
            ids = torch.tensor([prompt + reply], device=device)
            logits = model(input_ids=ids, logits_to_keep=len(reply) + 1).logits[0, :-1]
            own = torch.log_softmax(logits.float() / temperature, dim=-1)
            trained = float(own.gather(-1, torch.tensor(reply, device=device)[:, None]).sum())
        gaps.append(abs(served - trained))
    gap = max(gaps)
    if gap > tolerance:
        raise LogprobMismatch(
            f"the serving engine's log-probs differ from the trainer's by up to {gap:.4f} "
            f"(tolerance {tolerance}) on {len(gaps)} probe replies: it is not sampling the "
            "policy being trained"
        )
    return gap


def rollout_work(
    before: EngineStats, after: EngineStats, probe: Sequence[tuple[list[int], list[int]]]
) -> dict[str, float]:
    """Tokens a rollout ran forward and rows it projected onto the vocabulary: the engine's
    (prefill, decode, teacher-forced scoring) between two snapshots of its stats, and the
    trainer's forward over the probe."""
    decoded = after.decode_rows - before.decode_rows
    engine_tokens = after.prefill_tokens - before.prefill_tokens + decoded
    engine_tokens += after.scored_tokens - before.scored_tokens
    return {
        "work_rollout_tokens": float(engine_tokens + sum(len(p) + len(r) for p, r in probe)),
        "work_rollout_logits": float(
            after.logit_rows - before.logit_rows + sum(len(r) + 1 for _, r in probe)
        ),
    }


def check_rollout_logprobs(
    trained: Tensor, served: Tensor, mask: Tensor, tolerance: float
) -> float:
    """The largest difference of a reply's summed log-prob (B, C) between the trainer's model
    and the engine that sampled it, before any update; LogprobMismatch above tolerance."""
    with torch.no_grad():
        gap = float(((trained - served) * mask).sum(dim=1).abs().max().item())
    if gap > tolerance:
        raise LogprobMismatch(
            f"the serving engine's log-probs of the replies it sampled differ from the "
            f"trainer's by up to {gap:.4f} (tolerance {tolerance}): it is not sampling the "
            "policy being trained"
        )
    return gap


def _prompt_batches(
    prompts: Sequence[list[ChatMessage]],
    batch_size: int,
    generator: torch.Generator,
    by_conversation: bool = False,
) -> Iterator[list[int]]:
    """Endless batches of prompt indices: shuffled passes over all prompts, wrapping around. By
    conversation, a pass shuffles conversations (prompts that open with the same two messages)
    and keeps each one's states together, in order."""
    if by_conversation:
        groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
        for index, messages in enumerate(prompts):
            opening = tuple((m.role, m.content) for m in messages[:2])
            groups.setdefault(opening, []).append(index)
        units = list(groups.values())
    else:
        units = [[index] for index in range(len(prompts))]
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            for unit in torch.randperm(len(units), generator=generator).tolist():
                pending.extend(units[unit])
        yield pending[:batch_size]
        pending = pending[batch_size:]


# -- the algorithm ----------------------------------------------------------------------------


def train_ppo(
    *,
    base_model: Path,
    parent_adapter: Path,
    prompts: Sequence[list[ChatMessage]],
    reward_fn: RewardFn,
    config: PPOConfig,
    output_dir: Path,
    progress: ProgressFn,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Run PPO from pi_i and save pi_{i+1} to output_dir: (summary metrics, per-update metrics)."""
    torch.manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(base_model)
    model = load_policy(base_model, parent_adapter, device)
    model.load_adapter(str(parent_adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter(POLICY_ADAPTER)
    model.eval()
    if config.tree_attention:  # packed minibatches: only the blocks their tree mask keeps
        enable_tree_attention(model)
    value_head = ValueHead(model.config.hidden_size).to(device)
    policy_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": policy_params, "lr": config.learning_rate},
            {"params": list(value_head.parameters()), "lr": config.value_learning_rate},
        ],
        weight_decay=0.0,
    )
    all_params = [*policy_params, *value_head.parameters()]
    batches = _prompt_batches(prompts, config.batch_size, order, config.batch_by_conversation)
    history: list[dict[str, float]] = []
    started = time.monotonic()
    engine = rollout_engine(model, tokenizer, config)
    probe: list[tuple[list[int], list[int]]] = []
    try:
        for update in range(config.num_updates):
            update_started = time.monotonic()
            # 1. Rollout: sample replies from the current policy, score them with Q, and record the
            # log-probs of the policy that sampled them, of pi_i, and the values.
            batch = [prompts[i] for i in next(batches)]
            served_gap: dict[str, float] = {}
            work: dict[str, float] = {}
            if engine is not None:
                before = replace(engine.stats)
                sync_policy(engine, model)
                served = sample_from_engine(
                    engine,
                    tokenizer,
                    batch,
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    seed=config.seed * 1_000_003 + update * len(batch),
                    # Both adapters are pi_i's file until the first optimiser step.
                    policy_is_reference=update == 0,
                )
                if not probe:  # fixed from the first rollout on
                    probe.append((served.prompts[0][-PROBE_PROMPT_TOKENS:], served.replies[0]))
                served_gap["served_logprob_gap"] = check_served_logprobs(
                    engine, model, probe, config.temperature, config.logprob_tolerance
                )
                work = rollout_work(before, engine.stats, probe)
                rollout = served.rollout.to(device)
                old_logprobs, ref_logprobs = (
                    served.logprobs.to(device),
                    served.ref_logprobs.to(device),
                )
                entropy = served.entropy.to(device)
                nucleus = None if served.nucleus is None else served.nucleus.to(device)
                with torch.no_grad():
                    old_values = value_head(served.hidden.to(device))
            else:
                rollout = sample_replies(
                    model,
                    tokenizer,
                    batch,
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                )
                old_logprobs, ref_logprobs, old_values, entropy, nucleus = score_rollout(
                    model,
                    value_head,
                    rollout,
                    config.temperature,
                    config.top_p,
                    config.minibatch_size,
                )
            q = torch.tensor(checked_rewards(reward_fn(batch, rollout.texts), len(batch)))
            q = q.to(device)
            mask = rollout.reply_mask
            with torch.no_grad():
                # 2. Per-token rewards: the KL penalty to pi_i everywhere, Q at the last token.
                kl = (old_logprobs - ref_logprobs) * mask
                score = q
                if config.whiten_scores:
                    score = masked_whiten(score, torch.ones_like(score))
                if config.score_clip is not None:
                    score = score.clamp(-config.score_clip, config.score_clip)
                rewards = token_rewards(score, kl, mask, config.beta)
                advantages, returns = compute_gae(
                    rewards, old_values, mask, config.gamma_tok, config.lam
                )
                if config.whiten_advantages:
                    advantages = masked_whiten(advantages, mask) * mask

            # 3. Optimise: n_ppo_epochs passes of minibatches over this rollout.
            rollout_seconds = time.monotonic() - update_started
            stats: dict[str, list[float]] = {
                k: []
                for k in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl")
            }
            epochs_run = 0
            packed_tokens = packed_logits = 0
            for _ in range(config.n_ppo_epochs):
                epoch_kl: list[float] = []
                permutation = torch.randperm(len(batch), generator=order).tolist()
                for start in range(0, len(batch), config.minibatch_size):
                    rows = permutation[start : start + config.minibatch_size]
                    packed = pack_rows(rollout_rows(rollout, rows), mask.shape[1], device)
                    logprobs, _, hidden = reply_forward(
                        model,
                        packed,
                        config.temperature,
                        nucleus=None if nucleus is None else nucleus[rows],
                    )
                    packed_tokens += packed.tokens
                    packed_logits += len(packed.keep)
                    if engine is not None and epochs_run == 0 and start == 0:
                        # Nothing is updated yet: the trainer's log-probs are the synced policy's,
                        # so they must be the sampler's on every row of this minibatch too.
                        served_gap["served_logprob_gap_rollout"] = check_rollout_logprobs(
                            logprobs, old_logprobs[rows], mask[rows], config.logprob_tolerance
                        )
                    values = value_head(hidden)
                    pg_loss, clipfrac, approx_kl = policy_loss(
                        logprobs, old_logprobs[rows], advantages[rows], mask[rows], config.cliprange
                    )
                    vf_loss, vf_clipfrac = value_loss(
                        values, old_values[rows], returns[rows], mask[rows], config.cliprange_value
                    )
                    loss = pg_loss + config.vf_coef * vf_loss
                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(all_params, config.max_grad_norm)
                    optimizer.step()
                    for key, value in (
                        ("policy_loss", pg_loss),
                        ("value_loss", vf_loss),
                        ("clipfrac", clipfrac),
                        ("value_clipfrac", vf_clipfrac),
                        ("approx_kl", approx_kl),
                    ):
                        stats[key].append(float(value.item()))
                    epoch_kl.append(float(approx_kl.item()))
                epochs_run += 1
                if (
                    config.target_kl is not None
                    and sum(epoch_kl) / len(epoch_kl) > config.target_kl
                ):
                    break

            kl_per_reply = kl.sum(dim=1)
            metrics = {
                "update": float(update + 1),
                "q_mean": float(q.mean().item()),
                "q_std": float(q.std().item()) if len(batch) > 1 else 0.0,
                "reward_mean": float((q - config.beta * kl_per_reply).mean().item()),
                "kl_ref": float(kl_per_reply.mean().item()),
                "kl_ref_per_token": float(masked_mean(kl, mask).item()),
                "entropy": float(masked_mean(entropy, mask).item()),
                "reply_tokens": float(mask.sum(dim=1).mean().item()),
                "epochs": float(epochs_run),
                "seconds": time.monotonic() - started,
                # Rollout (sampling, Q, pi_i's log-probs, values) and the optimisation epochs.
                "rollout_seconds": rollout_seconds,
                "optimise_seconds": time.monotonic() - update_started - rollout_seconds,
                # Tokens computed per row and epoch: shared prefixes once (pack_rows).
                "optimise_tokens_per_row": packed_tokens / (epochs_run * len(batch)),
                # What the linear layers computed (tests/benchmarks/floor.py turns it into FLOPs):
                # the rollout's forward tokens and logits (engine path only), the optimisation's.
                **work,
                "work_train_tokens": float(packed_tokens),
                "work_train_logits": float(packed_logits),
                **served_gap,
                **{key: sum(seen) / len(seen) for key, seen in stats.items()},
            }
            history.append(metrics)
            log.info(
                "ppo update %d/%d: q %.4f kl_ref %.4f clipfrac %.3f",
                update + 1,
                config.num_updates,
                metrics["q_mean"],
                metrics["kl_ref"],
                metrics["clipfrac"],
            )
            progress("ppo", (update + 1) / config.num_updates)

        save_policy(model, output_dir)
        summary = {**history[-1], "q_mean_first": history[0]["q_mean"]}
        return summary, history
    finally:
        if engine is not None:
            engine.close()
