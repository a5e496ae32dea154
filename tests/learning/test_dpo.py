"""DPO on business edits through TRL: which edits make pairs, how a long state is cut, and a
learning run on the tiny model through improve_offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.learning.test_dmpo import LOSER_TURN, WINNER_TURN, held_out_margin
from tests.learning.test_ppo import (
    TRAIN_PROMPTS,
    lora_weights,
    one_thread,  # noqa: F401  (a fixture, used by name below)
)
from workers.learning.chat import Turn
from workers.learning.configs import DMPOConfig, DPOConfig
from workers.learning.dpo import dpo_rows, selected_edits
from workers.learning.improve import improve_offline
from workers.learning.preferences import EditPair

SYSTEM = "You write the next message of acme."


def edit(
    text: str, chosen: str, rejected: str, relation: str = "rejected", outcome: int = 0
) -> EditPair:
    return EditPair("c", SYSTEM, (Turn("customer", text),), chosen, rejected, relation, outcome)


def test_selected_edits_follow_relations_and_outcome() -> None:
    edits = [
        edit("a", "x", "y", "edited", 1),
        edit("b", "x", "y", "rejected", 0),
        edit("c", "x", "y", "rejected", 1),
        edit("d", "same", " same ", "edited", 1),  # no preference to learn
    ]
    assert [e.state[0].text for e in selected_edits(edits, DPOConfig())] == ["a", "b", "c"]
    only_edited = DPOConfig(relations=("edited",))
    assert [e.state[0].text for e in selected_edits(edits, only_edited)] == ["a"]
    reached = DPOConfig(outcome="reached")
    assert [e.state[0].text for e in selected_edits(edits, reached)] == ["a", "c"]
    with pytest.raises(ValueError, match="relations"):
        DPOConfig(relations=("accepted",))
    with pytest.raises(ValueError, match="outcome"):
        DPOConfig(outcome="won")


def test_dpo_rows_drop_the_oldest_turns_of_a_long_state(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    state = tuple(
        Turn("customer" if i % 2 == 0 else "business", f"message number {i} about the sofa")
        for i in range(21)
    )
    long = EditPair("c", SYSTEM, state, "It costs 900 dollars.", "Yes.", "rejected", 0)
    (row,) = dpo_rows(tokenizer, [long], max_length=96)
    prompt = row["prompt"]
    assert prompt[0] == {"role": "system", "content": SYSTEM}
    assert prompt[-1] == {"role": "user", "content": "message number 20 about the sofa"}
    assert len(prompt) < 22  # turns were dropped, from the oldest
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    reply = tokenizer("It costs 900 dollars.", add_special_tokens=False)["input_ids"]
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) + len(reply) + 2 <= 96
    assert row["chosen"] == [{"role": "assistant", "content": "It costs 900 dollars."}]
    (short,) = dpo_rows(tokenizer, [long], max_length=4096)
    assert len(short["prompt"]) == 22  # everything fits: nothing dropped


@pytest.mark.usefixtures("one_thread")
def test_dpo_on_edits_learns_what_the_business_wrote(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    parent = tiny_adapters["zero"]
    edits = [
        edit(messages[-1].content, WINNER_TURN, LOSER_TURN, "rejected", i % 2)
        for i, messages in enumerate(TRAIN_PROMPTS)
    ]
    config = DPOConfig(n_epochs=4, batch_size=4, learning_rate=3e-3, beta=0.5, device="cpu")
    reported: list[tuple[str, float]] = []
    result = improve_offline(
        algorithm="dpo",
        base_model=tiny_model,
        parent_adapter=parent,
        data=edits,
        config=config,
        output_dir=tmp_path / "pi1",
        progress=lambda stage, fraction: reported.append((stage, fraction)),
    )
    history = result.history
    assert len(history) == 4 * 5  # 20 pairs, 4 a step, 4 epochs
    assert history[-1]["reward_margin"] > history[0]["reward_margin"] + 0.1, history[-1]
    # Measured, seeds 0-2: +3.9 to +4.0 nats on average, at least +3.6 at every prompt.
    gain = held_out_margin(tiny_model, result.adapter_dir) - held_out_margin(tiny_model, parent)
    assert (gain > 0).all() and gain.mean() > 1.0, gain
    old, new = lora_weights(parent), lora_weights(result.adapter_dir)
    assert new.keys() == old.keys()  # TRL's "ref" copy is not saved with it
    assert reported[-1] == ("done", 1.0)
    assert result.metrics["pairs"] == 20


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("algorithm", ["dpo", "dmpo"])
def test_the_reference_is_the_parent_policy_not_the_base(
    algorithm: str, tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """From a parent that differs from the base, the first step's loss is exactly ln 2: the
    policy and the reference are the same pi_i, so every implicit reward is 0. (A reference of
    the base model would give another loss.)"""
    import math

    from tests.learning.test_dmpo import _newline_pairs

    data: list = [  # type: ignore[type-arg]
        edit(m[-1].content, WINNER_TURN, LOSER_TURN) for m in TRAIN_PROMPTS[:8]
    ]
    config: DPOConfig | DMPOConfig = DPOConfig(n_epochs=1, batch_size=4, device="cpu")
    if algorithm == "dmpo":
        data, config = _newline_pairs(8), DMPOConfig(n_epochs=1, batch_size=4, device="cpu")
    result = improve_offline(
        algorithm=algorithm,  # type: ignore[arg-type]
        base_model=tiny_model,
        parent_adapter=tiny_adapters["noisy"],
        data=data,
        config=config,
        output_dir=tmp_path / "pi1",
    )
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result.history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
