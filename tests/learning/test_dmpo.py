"""DMPO: the turn weights and the loss against hand computations (unequal lengths, the gamma -> 1
and single-turn limits), the packed log-probs against one forward pass per turn, and a learning
run on the tiny model through improve_offline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.learning.test_ppo import (
    HELD_OUT_PROMPTS,
    TRAIN_PROMPTS,
    lora_weights,
    one_thread,  # noqa: F401  (a fixture, used by name below)
)
from workers.learning.chat import Turn
from workers.learning.configs import DMPOConfig
from workers.learning.dmpo import (
    dmpo_loss,
    packed_sequence_logprobs,
    trajectory_rows,
    turn_weights,
)
from workers.learning.improve import improve_offline
from workers.learning.policy_model import load_policy, load_tokenizer
from workers.learning.ppo import pack_rows
from workers.learning.preferences import LoggedConversation, PreferencePair, Trajectory


def sigmoid_loss(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


def test_turn_weights_by_hand() -> None:
    # gamma 0.5, T 3: phi(t) = 0.5^t (1 - 0.5^(3-t)) / (1 - 0.5^3)
    assert turn_weights(3, 0.5) == pytest.approx([1.0, 0.375 / 0.875, 0.125 / 0.875])
    assert turn_weights(4, 1.0) == [1.0, 0.75, 0.5, 0.25]
    assert turn_weights(1, 0.3) == [1.0]
    # gamma -> 1 is continuous into (T - t) / T
    assert turn_weights(5, 1 - 1e-9) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2], abs=1e-6)
    with pytest.raises(ValueError):
        turn_weights(0, 0.9)


def test_dmpo_loss_by_hand_with_unequal_lengths() -> None:
    beta, gamma = 0.5, 0.8
    # winner: 2 turns, loser: 3 turns (padded to 3 with weight 0)
    w_policy, w_ref = [-3.0, -5.0], [-3.5, -4.0]
    l_policy, l_ref = [-2.0, -6.0, -1.0], [-2.5, -5.0, -2.0]
    phi_w = [gamma**t * (1 - gamma ** (2 - t)) / (1 - gamma**2) for t in range(2)]
    phi_l = [gamma**t * (1 - gamma ** (3 - t)) / (1 - gamma**3) for t in range(3)]
    chosen = beta * sum(p * (a - b) for p, a, b in zip(phi_w, w_policy, w_ref, strict=True))
    rejected = beta * sum(p * (a - b) for p, a, b in zip(phi_l, l_policy, l_ref, strict=True))
    expected = sigmoid_loss(chosen - rejected)

    loss, chosen_reward, rejected_reward = dmpo_loss(
        torch.tensor([[*w_policy, 0.0]]),
        torch.tensor([[*w_ref, 0.0]]),
        torch.tensor([[*turn_weights(2, gamma), 0.0]]),
        torch.tensor([l_policy]),
        torch.tensor([l_ref]),
        torch.tensor([turn_weights(3, gamma)]),
        beta,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen_reward.item() == pytest.approx(chosen, rel=1e-6)
    assert rejected_reward.item() == pytest.approx(rejected, rel=1e-6)


def test_dmpo_reduces_to_dpo_forms() -> None:
    beta = 0.1
    torch.manual_seed(0)
    policy_w, ref_w, policy_l, ref_l = (torch.randn(4, 3) * 3 for _ in range(4))
    # gamma -> 1 with equal lengths: DPO on the trajectories with weights (T - t) / T, which are
    # the same on both sides, so the two trajectories' normalisers cancel as in DPO.
    weights = torch.tensor([turn_weights(3, 1 - 1e-9)] * 4)
    loss, _, _ = dmpo_loss(policy_w, ref_w, weights, policy_l, ref_l, weights, beta)
    for p in range(4):
        margin = sum(
            (3 - t) / 3 * ((policy_w[p, t] - ref_w[p, t]) - (policy_l[p, t] - ref_l[p, t]))
            for t in range(3)
        )
        assert loss[p].item() == pytest.approx(sigmoid_loss(beta * float(margin)), rel=1e-5)
    # one turn on each side: exactly DPO's -log sigmoid(beta ((w - w_ref) - (l - l_ref)))
    one = torch.ones(4, 1)
    loss, _, _ = dmpo_loss(
        policy_w[:, :1], ref_w[:, :1], one, policy_l[:, :1], ref_l[:, :1], one, beta
    )
    dpo = [
        sigmoid_loss(beta * float((policy_w[p, 0] - ref_w[p, 0]) - (policy_l[p, 0] - ref_l[p, 0])))
        for p in range(4)
    ]
    assert loss.tolist() == pytest.approx(dpo, rel=1e-5)


def _conversation(cid: str, turns: list[tuple[str, str]], outcome: int) -> LoggedConversation:
    return LoggedConversation(
        conversation_id=cid,
        group="acme",
        system="You write the next message of acme.",
        turns=tuple(Turn(r, t) for r, t in turns),
        outcome=outcome,
    )


def test_trajectory_rows_are_the_served_prompts_and_the_sent_turns(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    conversation = _conversation(
        "c1",
        [
            ("customer", "Hi, do you renovate kitchens?"),
            ("business", "Yes we do, how big is your kitchen?"),
            ("customer", "About ten square metres."),
            ("business", "We offer a free quote and a ten year warranty on all work."),
        ],
        1,
    )
    end = tokenizer.eos_token_id
    rows = trajectory_rows(
        tokenizer, Trajectory(conversation, 2), max_turns=8, max_action_tokens=64, end_id=end
    )
    assert len(rows) == 1  # the business turns from index 2 on
    prompt, action = rows[0]
    text = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "You write the next message of acme."},
            {"role": "user", "content": "Hi, do you renovate kitchens?"},
            {"role": "assistant", "content": "Yes we do, how big is your kitchen?"},
            {"role": "user", "content": "About ten square metres."},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == tokenizer(text, add_special_tokens=False)["input_ids"]
    sent = tokenizer("We offer a free quote and a ten year warranty on all work.")["input_ids"]
    assert action == [*sent, end]
    cut = trajectory_rows(
        tokenizer, Trajectory(conversation, 0), max_turns=1, max_action_tokens=3, end_id=end
    )
    assert len(cut) == 1 and len(cut[0][1]) == 3 and cut[0][1][-1] != end


def test_packed_sequence_logprobs_equal_one_forward_per_turn(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    torch.manual_seed(1)
    vocab = model.config.vocab_size
    shared = torch.randint(0, vocab, (7,)).tolist()
    rows = [
        (shared, torch.randint(0, vocab, (4,)).tolist()),
        ([*shared, 3, 5], torch.randint(0, vocab, (2,)).tolist()),
        (shared, torch.randint(0, vocab, (5,)).tolist()),  # same prompt, another reply
        (torch.randint(0, vocab, (4,)).tolist(), torch.randint(0, vocab, (1,)).tolist()),
    ]
    with torch.no_grad():
        packed = packed_sequence_logprobs(model, pack_rows(rows))
        for r, (prompt, reply) in enumerate(rows):
            ids = torch.tensor([prompt + reply])
            logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            expected = sum(
                float(logps[len(prompt) - 1 + j, token]) for j, token in enumerate(reply)
            )
            assert packed[r].item() == pytest.approx(expected, abs=1e-4), r


WINNER_TURN, LOSER_TURN = "\n\n\n\n", "We offer a free quote."


def held_out_margin(base_model: Path, adapter: Path) -> torch.Tensor:
    """log pi(winner's turn) - log pi(loser's turn) at each held-out prompt (8,)."""
    tokenizer = load_tokenizer(base_model)
    model = load_policy(base_model, adapter, "cpu").eval()
    end = tokenizer.eos_token_id
    rows = []
    for messages in HELD_OUT_PROMPTS:
        text = tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
        )
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        for turn in (WINNER_TURN, LOSER_TURN):
            rows.append((prompt, [*tokenizer(turn, add_special_tokens=False)["input_ids"], end]))
    with torch.no_grad():
        logps = packed_sequence_logprobs(model, pack_rows(rows))
    return logps[0::2] - logps[1::2]


def _newline_pairs(n: int) -> list[PreferencePair]:
    """Winners answer with newlines, losers without, from the same customer message."""
    pairs = []
    for i, messages in enumerate(TRAIN_PROMPTS[:n]):
        opening = messages[-1].content
        winner = _conversation(
            f"w{i}",
            [
                ("customer", opening),
                ("business", "\n\n\n\n"),
                ("customer", "ok"),
                ("business", "\n\n"),
            ],
            1,
        )
        loser = _conversation(
            f"l{i}",
            [
                ("customer", opening),
                ("business", LOSER_TURN),
                ("customer", "ok"),
                ("business", "Thanks for your message."),
                ("customer", "bye"),
                ("business", "See you then."),
            ],
            0,
        )
        pairs.append(PreferencePair(Trajectory(winner, 1), Trajectory(loser, 1), 1, 1.0))
    return pairs


@pytest.mark.usefixtures("one_thread")
def test_dmpo_learns_to_prefer_the_winners_turns(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    parent = tiny_adapters["zero"]
    config = DMPOConfig(
        n_epochs=6, batch_size=4, learning_rate=3e-3, beta=0.5, gamma=0.9, device="cpu"
    )
    reported: list[tuple[str, float]] = []
    result = improve_offline(
        algorithm="dmpo",
        base_model=tiny_model,
        parent_adapter=parent,
        data=_newline_pairs(16),
        config=config,
        output_dir=tmp_path / "pi1",
        progress=lambda stage, fraction: reported.append((stage, fraction)),
    )
    history = result.history
    assert len(history) == 6 * 4
    assert history[-1]["loss"] < history[0]["loss"] - 0.2, (history[0], history[-1])
    assert history[-1]["reward_accuracy"] == 1.0
    # What was learned holds at states it never saw: at every held-out prompt the policy now
    # prefers the winners' kind of turn to the losers' by more than pi_i did. (Measured, seeds
    # 0-2: +3.9 to +4.0 nats on average, at least +3.7 at every prompt. DPO-style losses mostly
    # push the loser's tokens down, so the newline rate of samples barely moves on this tiny
    # model: 0.064 -> 0.074 to 0.080.)
    gain = held_out_margin(tiny_model, result.adapter_dir) - held_out_margin(tiny_model, parent)
    assert (gain > 0).all() and gain.mean() > 1.0, gain
    old, new = lora_weights(parent), lora_weights(result.adapter_dir)
    assert new.keys() == old.keys()  # the reference copy is not saved
    assert reported[-1] == ("done", 1.0)
