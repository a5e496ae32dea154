"""The PersuasionForGood converter on the real corpus (skipped where shared/ is absent)."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from services.conversations.jsonl import ConversationRecord
from tests.data_sources.persuasionforgood import (
    DEFAULT_DATA_DIR,
    available,
    load_conversations,
    load_split,
    step_examples,
    write_jsonl,
)

pytestmark = pytest.mark.skipif(
    not available(), reason=f"PersuasionForGood not found at {DEFAULT_DATA_DIR}"
)


def csv_rows(name: str) -> list[dict[str, str]]:
    with (DEFAULT_DATA_DIR / name).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_a_few_dialogues_convert_faithfully() -> None:
    ids = json.loads((DEFAULT_DATA_DIR / "splits.json").read_text())["train"][:5]
    conversations = load_conversations(ids=ids)
    assert [c["id"] for c in conversations] == ids
    dialog, info = csv_rows("full_dialog.csv"), csv_rows("full_info.csv")
    for conversation in conversations:
        ConversationRecord.model_validate(conversation)  # the import format accepts it
        rows = [r for r in dialog if r["B2"] == conversation["id"]]
        messages = conversation["messages"]
        roles = [m["role"] for m in messages]
        assert roles[0] == "business"  # the persuader opens every chat
        assert all(a != b for a, b in itertools.pairwise(roles))  # one speaker's rows merged
        assert (
            " ".join(m["text"] for m in messages).split()
            == " ".join(r["Unit"] for r in rows).split()
        )
        business_rows = [r["Unit"].strip() for r in rows if r["B4"] == "0"]
        assert " ".join(m["text"] for m in messages if m["role"] == "business") == " ".join(
            business_rows
        )
        [donation] = [r["B6"] for r in info if r["B2"] == conversation["id"] and r["B4"] == "1"]
        assert conversation["outcome"] == int(float(donation) > 0)
        assert conversation["end"] == ("outcome" if conversation["outcome"] else "customer_left")
        assert conversation["business_id"] == "persuasionforgood"


def test_step_examples_reward_only_the_end() -> None:
    [conversation] = load_conversations(ids=["20180904-045349_715_live"])
    conversation = {**conversation, "outcome": 1}
    examples = step_examples([conversation], gamma=0.5)
    business = [i for i, m in enumerate(conversation["messages"]) if m["role"] == "business"]
    assert len(examples) == len(business)
    k = len(business)
    for step, (example, position) in enumerate(zip(examples, business, strict=True)):
        assert (example.step, example.n_steps) == (step, k)
        assert example.action == conversation["messages"][position]["text"]
        assert [t.text for t in example.state] == [
            m["text"] for m in conversation["messages"][:position]
        ]
        assert example.ret == 0.5 ** (k - 1 - step)
        assert example.outcome == 1
    assert examples[-1].ret == 1.0
    assert all(e.ret == 0.0 for e in step_examples([{**conversation, "outcome": 0}]))


def test_the_splits_are_written_as_jsonl(tmp_path: Path) -> None:
    paths = write_jsonl(DEFAULT_DATA_DIR, tmp_path)
    lines = {split: path.read_text().splitlines() for split, path in paths.items()}
    assert (len(lines["train"]), len(lines["dev"])) == (724, 105)
    assert json.loads(lines["dev"][0]) == load_split("dev")[0]


def test_dmpo_pairing_at_scale_on_the_train_split() -> None:
    """The pairing rule on real conversations with real outcomes: every persuader opens, so all
    chats start from the same (empty) state; a pair starts where the two diverge."""
    from collections import Counter

    from workers.learning.chat import Turn as LearningTurn
    from workers.learning.preferences import LoggedConversation, pair_conversations

    conversations = [
        LoggedConversation(
            conversation_id=c["id"],
            group=c["business_id"],
            system=None,
            turns=tuple(LearningTurn(m["role"], m["text"]) for m in c["messages"]),
            outcome=int(c["outcome"]),
        )
        for c in load_split("train")
    ]
    winners = sum(c.outcome for c in conversations)
    losers = len(conversations) - winners
    pairs = pair_conversations(conversations, opening_similarity=0.3, max_pairs_per_conversation=2)
    used = Counter(
        cid
        for p in pairs
        for cid in (p.chosen.conversation.conversation_id, p.rejected.conversation.conversation_id)
    )
    steps = sum(len(p.chosen.steps()) + len(p.rejected.steps()) for p in pairs)
    print(
        f"PersuasionForGood train: {len(conversations)} conversations, {winners} donated; "
        f"{len(pairs)} pairs; shared turns {Counter(p.shared_turns for p in pairs)}; "
        f"turns per trajectory {steps / (2 * len(pairs)):.1f}"
    )
    assert min(winners, losers) <= len(pairs) <= 2 * min(winners, losers)
    assert max(used.values()) <= 2
    for p in pairs:
        assert p.chosen.conversation.outcome == 1 and p.rejected.conversation.outcome == 0
        assert p.chosen.start == p.rejected.start == p.shared_turns
        assert p.chosen.steps() and p.rejected.steps()
        turns_w, turns_l = p.chosen.conversation.turns, p.rejected.conversation.turns
        assert turns_w[: p.shared_turns] == turns_l[: p.shared_turns]
        assert turns_w[p.shared_turns] != turns_l[p.shared_turns]
