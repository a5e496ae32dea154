"""DMPO: Direct Multi-Turn Preference Optimization (Shi et al. 2024, "Direct Multi-Turn
Preference Optimization for Language Agents"), on pairs of logged conversations.

DPO compares two replies to one prompt; its partition function Z(s) cancels because both
replies share s. Over whole trajectories the states differ turn by turn, and DPO's per-state
partition functions no longer cancel. DMPO replaces DPO's constraint on the policy (KL to
pi_ref at each state) by one on the discounted state-action occupancy measure, which makes
the partition function a constant, and normalises both trajectories' lengths in the
Bradley-Terry model so that the constant cancels between trajectories of unequal length T_w
and T_l. What remains (the paper's DMPO loss) is, per pair from one starting state:

    L = -log sigmoid( sum_{t<T_w} phi(t, T_w) beta log(pi(a_t^w|s_t^w) / pi_ref(a_t^w|s_t^w))
                    - sum_{t<T_l} phi(t, T_l) beta log(pi(a_t^l|s_t^l) / pi_ref(a_t^l|s_t^l)) )

    phi(t, T) = gamma^t (1 - gamma^(T - t)) / (1 - gamma^T),  and (T - t) / T at gamma = 1,

the weights exactly as the authors' trainer computes them (swt-user/DMPO,
fastchat/train/dmpo_trainer_efficient.py: one coefficient per turn on every token of that turn,
applied to the policy's and the reference's log-probs alike). gamma < 1 lets a trajectory's
early turns dominate; a single-turn pair (T_w = T_l = 1) has phi = 1 and is plain DPO.

Here a trajectory is a conversation's business turns from the state where the pair diverges
(workers/learning/preferences.py says how pairs are made), a_t the business's turn as sent,
pi_ref = pi_i (a frozen copy of the parent adapter, as in our PPO), log-probs at temperature 1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workers.learning.chat import prompt_messages
from workers.learning.configs import DMPOConfig
from workers.learning.policy_model import (
    POLICY_ADAPTER,
    ProgressFn,
    end_token_ids,
    load_policy,
    load_tokenizer,
    resolve_device,
    save_policy,
)
from workers.learning.ppo import REFERENCE_ADAPTER, PackedRows, pack_rows
from workers.learning.preferences import PreferencePair, Trajectory

log = logging.getLogger(__name__)

Row = tuple[list[int], list[int]]  # (prompt tokens, action tokens) of one business turn


def turn_weights(n_turns: int, gamma: float) -> list[float]:
    """phi(t, T) for t = 0 .. T-1: gamma^t (1 - gamma^(T-t)) / (1 - gamma^T); (T - t) / T at
    gamma = 1 (its limit)."""
    if n_turns < 1:
        raise ValueError(f"a trajectory needs at least one turn, not {n_turns}")
    if gamma == 1.0:
        return [(n_turns - t) / n_turns for t in range(n_turns)]
    return [gamma**t * (1 - gamma ** (n_turns - t)) / (1 - gamma**n_turns) for t in range(n_turns)]


def weighted_log_ratio(policy_logps: Tensor, reference_logps: Tensor, weights: Tensor) -> Tensor:
    """sum_t phi(t, T) log(pi(a_t|s_t) / pi_ref(a_t|s_t)) per trajectory, from (P, T) per-turn
    log-probs and weights (weight 0 past a trajectory's last turn)."""
    return ((policy_logps - reference_logps) * weights).sum(dim=-1)


def dmpo_loss(
    chosen_logps: Tensor,
    chosen_reference_logps: Tensor,
    chosen_weights: Tensor,
    rejected_logps: Tensor,
    rejected_reference_logps: Tensor,
    rejected_weights: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The DMPO loss per pair (P,) and each side's implicit reward beta * sum_t phi * log-ratio
    (P,) each, detached."""
    chosen = beta * weighted_log_ratio(chosen_logps, chosen_reference_logps, chosen_weights)
    rejected = beta * weighted_log_ratio(rejected_logps, rejected_reference_logps, rejected_weights)
    loss = -nn.functional.logsigmoid(chosen - rejected)
    return loss, chosen.detach(), rejected.detach()


def trajectory_rows(
    tokenizer: Any, trajectory: Trajectory, *, max_turns: int, max_action_tokens: int, end_id: int
) -> list[Row]:
    """Each business turn of the trajectory as (prompt, action) tokens: the chat prompt of its
    state (as the policy is prompted when serving) and the turn's text, ended by `end_id`
    unless cut at max_action_tokens."""
    rows = []
    system = trajectory.conversation.system
    for state, action in trajectory.steps(max_turns):
        text = tokenizer.apply_chat_template(
            [m.as_dict() for m in prompt_messages(system, state)],
            tokenize=False,
            add_generation_prompt=True,
        )
        prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        tokens = [*tokenizer(action, add_special_tokens=False)["input_ids"], end_id]
        rows.append((prompt, [int(t) for t in tokens[:max_action_tokens]]))
    return rows


def packed_sequence_logprobs(model: Any, packed: PackedRows, adapter: str | None = None) -> Tensor:
    """Each packed row's summed log-prob of its reply tokens at temperature 1 (R,), projecting
    only the positions that predict a reply token (shared ones once)."""
    extra = {"adapter_names": [adapter]} if adapter else {}
    output = model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=packed.attention_mask,
        logits_to_keep=packed.keep,
        **extra,
    )
    logits = output.logits[0].float()  # (K, V): one row per distinct predicting position
    normaliser = torch.logsumexp(logits, dim=-1)  # (K,)
    target = logits[packed.keep_index, packed.targets]  # (R, C)
    logprobs = (target - normaliser[packed.keep_index]) * packed.mask
    return logprobs.sum(dim=-1)


def _side(rows_logps: Tensor, counts: Sequence[int]) -> Tensor:
    """Per-turn log-probs (sum over rows of one side) laid out (P, T_max), zero-padded."""
    out = torch.zeros((len(counts), max(counts)), device=rows_logps.device)
    start = 0
    for p, n in enumerate(counts):
        out[p, :n] = rows_logps[start : start + n]
        start += n
    return out


def _weights(counts: Sequence[int], gamma: float, device: Any) -> Tensor:
    out = torch.zeros((len(counts), max(counts)), device=device)
    for p, n in enumerate(counts):
        out[p, :n] = torch.tensor(turn_weights(n, gamma))
    return out


def _pair_batch_logps(
    model: Any,
    batch: Sequence[tuple[list[Row], list[Row]]],
    device: Any,
    adapter: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-turn summed log-probs of the chosen and the rejected trajectories of `batch`, each
    (P, T_max): one packed forward pass over every turn of every trajectory."""
    chosen_rows = [row for chosen, _ in batch for row in chosen]
    rejected_rows = [row for _, rejected in batch for row in rejected]
    packed = pack_rows([*chosen_rows, *rejected_rows], device=device)
    logps = packed_sequence_logprobs(model, packed, adapter)
    chosen = _side(logps[: len(chosen_rows)], [len(c) for c, _ in batch])
    rejected = _side(logps[len(chosen_rows) :], [len(r) for _, r in batch])
    return chosen, rejected


def train_dmpo(
    *,
    base_model: Path,
    parent_adapter: Path,
    pairs: Sequence[PreferencePair],
    config: DMPOConfig,
    output_dir: Path,
    progress: ProgressFn,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """DMPO from pi_i on `pairs`; saves pi_{i+1} to output_dir: (summary metrics, per step)."""
    if not pairs:
        raise ValueError("DMPO needs at least one (winner, loser) pair of conversations")
    torch.manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(base_model)
    model = load_policy(base_model, parent_adapter, device)
    model.load_adapter(str(parent_adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter(POLICY_ADAPTER)
    model.eval()  # no dropout: the log-probs are the policy's
    end_id = end_token_ids(model, tokenizer)[0]

    def rows(trajectory: Trajectory) -> list[Row]:
        return trajectory_rows(
            tokenizer,
            trajectory,
            max_turns=config.max_turns,
            max_action_tokens=config.max_action_tokens,
            end_id=end_id,
        )

    data = [(rows(p.chosen), rows(p.rejected)) for p in pairs]
    weights = [
        (
            torch.tensor(turn_weights(len(c), config.gamma)),
            torch.tensor(turn_weights(len(r), config.gamma)),
        )
        for c, r in data
    ]
    # pi_i is frozen: its log-probs are computed once, pair by pair.
    reference: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for item in data:
            chosen, rejected = _pair_batch_logps(model, [item], device, REFERENCE_ADAPTER)
            reference.append((chosen[0].cpu(), rejected[0].cpu()))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = steps_per_epoch * config.n_epochs
    history: list[dict[str, float]] = []
    started = time.monotonic()
    for epoch in range(config.n_epochs):
        permutation = torch.randperm(len(data), generator=order).tolist()
        for start in range(0, len(data), config.batch_size):
            index = permutation[start : start + config.batch_size]
            batch = [data[i] for i in index]
            chosen, rejected = _pair_batch_logps(model, batch, device)
            ref_chosen = _stack([reference[i][0] for i in index], chosen.shape[1], device)
            ref_rejected = _stack([reference[i][1] for i in index], rejected.shape[1], device)
            w_chosen = _stack([weights[i][0] for i in index], chosen.shape[1], device)
            w_rejected = _stack([weights[i][1] for i in index], rejected.shape[1], device)
            losses, chosen_reward, rejected_reward = dmpo_loss(
                chosen, ref_chosen, w_chosen, rejected, ref_rejected, w_rejected, config.beta
            )
            loss = losses.mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            margin = chosen_reward - rejected_reward
            history.append(
                {
                    "step": float(len(history) + 1),
                    "epoch": float(epoch + 1),
                    "loss": float(loss.item()),
                    "chosen_reward": float(chosen_reward.mean().item()),
                    "rejected_reward": float(rejected_reward.mean().item()),
                    "reward_margin": float(margin.mean().item()),
                    "reward_accuracy": float((margin > 0).float().mean().item()),
                    "seconds": time.monotonic() - started,
                }
            )
            progress("dmpo", len(history) / total)
    log.info(
        "dmpo: %d pairs, %d steps, last loss %.4f, margin %.4f",
        len(data),
        len(history),
        history[-1]["loss"],
        history[-1]["reward_margin"],
    )
    save_policy(model, output_dir)
    summary = {
        **history[-1],
        "pairs": float(len(data)),
        "loss_first": history[0]["loss"],
        "turns_chosen": float(sum(len(c) for c, _ in data) / len(data)),
        "turns_rejected": float(sum(len(r) for _, r in data) / len(data)),
    }
    return summary, history


def _stack(rows: Sequence[Tensor], width: int, device: Any) -> Tensor:
    out = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out.to(device)
