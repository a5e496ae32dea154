"""The candidate check on the tiny model: a candidate trained against a Q with a planted error
is flagged by a check Q fitted on other data, and not flagged where its Q was right."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from tests.learning.test_ppo import (
    HELD_OUT_PROMPTS,
    TOY_NEW_TOKENS,
    TOY_PPO,
    TOY_TEMPERATURE,
    TRAIN_PROMPTS,
    newline_reward,
)
from tests.tiny_model import CORPUS
from workers.learning.candidate_check import (
    CheckDecision,
    CheckQ,
    CheckSettings,
    balanced_folds,
    fold_of,
    run_check,
)
from workers.learning.chat import Turn
from workers.learning.configs import QFitConfig
from workers.learning.examples import StepExample
from workers.learning.improve import improve_policy

SYSTEM = "You write the next message of acme."
STATES = [(Turn("customer", p[1].content),) for p in HELD_OUT_PROMPTS]
WORDS = " ".join(CORPUS).split()


def reply_with_newlines(rng: random.Random, newlines: int) -> str:
    words = [rng.choice(WORDS) for _ in range(TOY_NEW_TOKENS - newlines)]
    for _ in range(newlines):
        words.insert(rng.randrange(len(words) + 1), "\n")
    return " ".join(words)


def logged_examples(truth_prefers_newlines: bool) -> list[StepExample]:
    """Held-out decisions whose return is set by the reply's newlines: more is better, or worse."""
    rng = random.Random(0)
    examples = []
    for c in range(40):
        for step, state in enumerate(rng.sample(STATES, 3)):
            newlines = rng.randrange(5)
            share = newlines / 4
            examples.append(
                StepExample(
                    conversation_id=f"conv-{c}",
                    step=step,
                    n_steps=3,
                    state=state,
                    action=reply_with_newlines(rng, newlines),
                    ret=share if truth_prefers_newlines else 1.0 - share,
                    outcome=int(rng.random() < 0.5),
                    system=SYSTEM,
                )
            )
    return examples


@pytest.fixture(scope="module")
def newline_candidate(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """pi_{i+1} trained by PPO against a Q that pays for newlines (test_ppo's toy reward)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = improve_policy(
            algorithm="ppo",
            base_model=tiny_model,
            parent_adapter=tiny_adapters["zero"],
            prompts=TRAIN_PROMPTS,
            reward_fn=newline_reward,
            config=TOY_PPO,
            output_dir=tmp_path_factory.mktemp("candidate") / "pi1",
        )
    finally:
        torch.set_num_threads(threads)
    return result.adapter_dir


@pytest.mark.parametrize("truth_prefers_newlines", [False, True])
def test_the_check_flags_a_candidate_that_exploited_a_planted_error(
    tiny_model: Path,
    tiny_adapters: dict[str, Path],
    newline_candidate: Path,
    tmp_path: Path,
    truth_prefers_newlines: bool,
) -> None:
    examples = logged_examples(truth_prefers_newlines)
    # The trajectories: two decisions at held-out states per conversation, as pi_i logged them.
    rng = random.Random(1)
    decisions = [
        CheckDecision(
            conversation_id=f"conv-{c}",
            index=t,
            system=SYSTEM,
            state=STATES[(c + t) % len(STATES)],
            action=reply_with_newlines(rng, rng.randrange(2)),
            reward=float(t == 1 and c % 3 == 0),
            behaviour_ratio=1.0,
        )
        for c in range(12)
        for t in range(2)
    ]
    folds = balanced_folds(e.conversation_id for e in examples)
    assert {folds[d.conversation_id] for d in decisions} == {0, 1}
    result = run_check(
        base_model=tiny_model,
        parent_adapter=tiny_adapters["zero"],
        candidate_adapter=newline_candidate,
        decisions=decisions,
        check_examples=examples,
        q_config=QFitConfig(
            kind="head",
            base_model=str(tiny_model),
            head_pooling="state_reply",
            max_length=64,
            max_reply_length=16,
            device="cpu",
        ),
        settings=CheckSettings(
            samples=8,
            max_new_tokens=TOY_NEW_TOKENS,
            temperature=TOY_TEMPERATURE,
            top_p=1.0,
            clip=10.0,
            n_boot=500,
            device="cpu",
        ),
        # The Q that PPO optimised: the planted error pays for newlines whatever the truth.
        ppo_q=lambda items: newline_reward([], [reply for _, _, reply in items]),
        output_dir=tmp_path / "check",
    )
    gain = result.check["gain"]
    assert result.ppo_q_gain is not None and result.ppo_q_gain > 0.1  # PPO's Q sees a gain
    if truth_prefers_newlines:
        assert not result.check["flagged"], gain
        assert gain["lo"] is not None and gain["lo"] > 0
    else:
        assert result.check["flagged"], gain
        assert gain["hi"] is not None and gain["hi"] < 0
    # Every scored decision and its replies are on file, each with both Q's scores.
    records = [json.loads(line) for line in result.samples_file.read_text().splitlines()]
    assert len(records) == len(decisions) == result.check["n_states"]
    assert all(len(r["replies"]["candidate"]) == 8 for r in records)
    assert result.rates["n_conversations"] == 12
    assert result.rates["logged"]["value"] == pytest.approx(4 / 12)


def test_balanced_folds_split_conversations_evenly_by_hash_rank() -> None:
    ids = [f"conv-{i}" for i in range(101)] + ["conv-3", "conv-7"]  # repeats count once
    folds = balanced_folds(ids)
    # From the definition: rank the distinct ids by their hash fold key, deal them in turn.
    ranked = sorted(set(ids), key=lambda c: hashlib.sha256(f"check-fold:{c}".encode()).digest())
    assert folds == {c: i % 2 for i, c in enumerate(ranked)}
    assert sorted(Counter(folds.values()).values()) == [50, 51]
    assert balanced_folds(reversed(ids)) == folds  # the order they come in does not matter


def lopsided_ids(n: int) -> list[str]:
    """n conversation ids of which the hash alone puts all but one in fold 0."""
    zeros = [c for c in (f"c-{i}" for i in range(400)) if fold_of(c) == 0][: n - 1]
    one = next(c for c in (f"c-{i}" for i in range(400)) if fold_of(c) == 1)
    return [*zeros, one]


def test_the_check_q_scores_every_held_out_fold_even_where_hashes_are_lopsided(
    tiny_model: Path,
) -> None:
    """8 held-out conversations split 7 / 1 by hash left no head for the 7 (fitted on one
    conversation): their decisions dropped out of the check (the CI failure of stop 20)."""
    ids = lopsided_ids(8)
    assert sorted(Counter(fold_of(c) for c in ids).values()) == [1, 7]
    rng = random.Random(0)
    examples = [
        StepExample(
            conversation_id=c,
            step=0,
            n_steps=1,
            state=STATES[i % len(STATES)],
            action=reply_with_newlines(rng, i % 3),
            ret=float(i % 2),
            outcome=i % 2,
            system=SYSTEM,
        )
        for i, c in enumerate(ids)
    ]
    config = QFitConfig(kind="head", base_model=str(tiny_model), max_length=64, device="cpu")
    check_q = CheckQ(config, examples)
    assert sorted(Counter(check_q.fold(c) for c in ids).values()) == [4, 4]
    assert all(check_q.can_score(check_q.fold(c)) for c in ids)
    for fold in (0, 1):
        members = [e for e in examples if check_q.fold(e.conversation_id) == fold]
        scores = check_q.score(fold, [(e.system, e.state, e.action) for e in members])
        assert len(scores) == 4 and all(math.isfinite(v) for v in scores)
