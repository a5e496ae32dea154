"""The simulator: features on hand-written messages, determinism, the good-beats-bad sanity
check in every scenario, and conversations played through the real API on a tiny model."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.db import session_scope
from services.experiments.service import ArmSpec, create_experiment
from services.generation.embedded import EmbeddedBackend
from services.policies.models import PolicyStatus
from services.policies.service import register_policy
from services.simulator.agents import SimulatedCustomer, SimulatedRep
from services.simulator.features import FEATURE_NAMES, Turn, extract_features, is_needs_question
from services.simulator.runner import Policy, run_conversations, simulate_offline
from services.simulator.scenarios import RENOVATION, SCENARIOS, Scenario
from tests.conftest import Store, auth

ROOT = Path(__file__).resolve().parents[2]

# -- features --------------------------------------------------------------------------------

KITCHEN_ASKED: list[Turn] = [("customer", "Hi, do you renovate kitchens?")]
PLAIN: list[Turn] = [("customer", "Hello, we want a new bathroom.")]
PRICE_ASKED: list[Turn] = [("customer", "How much does a new bathroom cost?")]
PRICE_STATED: list[Turn] = [
    *PLAIN,
    ("business", "What would you like to change, and how big is the room?"),
    ("customer", "It's 6 square meters, we want a walk-in shower."),
    ("business", "A bathroom like yours costs about 9,000 euros."),
    ("customer", "Ok, noted."),
]
LATE: list[Turn] = [*PRICE_STATED, ("business", "We can start in May."), ("customer", "Good.")]
LONG = " ".join(["We renovate kitchens and bathrooms with our own team of craftsmen."] * 9)

# (message, conversation before it, the features that must fire; all others must be 0)
FEATURE_CASES: list[tuple[str, list[Turn], set[str]]] = [
    (
        "Yes, we renovate kitchens! What would you like to change, and how big is the room?",
        KITCHEN_ASKED,
        {"answers_question", "asks_needs_early"},
    ),
    (
        "We work in the whole region, from the city to the coast.",
        KITCHEN_ASKED,
        {"ignores_question"},
    ),
    ("Most bathrooms cost between 8,000 and 15,000 euros.", PRICE_ASKED, {"answers_question"}),
    ("It depends on a lot of different things.", PRICE_ASKED, {"ignores_question"}),
    ("Could we visit on Thursday at 10am to measure?", PLAIN, {"next_step"}),
    ("Our bathrooms are 9,000 euros, all included.", PLAIN, {"price_before_need"}),
    ("Ok.", PLAIN, {"too_short"}),
    (LONG, PLAIN, {"too_long"}),
    ("Thanks, we would be happy to help with that.", PLAIN, {"polite"}),
    ("This offer is limited, so buy now and don't miss it!", PLAIN, {"pushy"}),
    ("Whatever, as I said, it is your own choice.", PLAIN, {"rude"}),
    ("For you it would come to 7,500 euros in total.", PRICE_STATED, {"contradiction"}),
    ("And it stays at 9,000 euros in total.", PRICE_STATED, set()),
    ("That sounds like a great plan 😊", PLAIN, {"emoji"}),
    ("That sounds like a cheap and easy job for us.", PLAIN, {"off_brand"}),
    ("WeWeWeWe\ufffd\ufffd kitchens we do", PLAIN, {"garbled"}),
    # A needs question counts as early only among the business's first messages.
    ("How big is the room, and what would you like to change?", LATE, set()),
]


@pytest.mark.parametrize(("text", "history", "expected"), FEATURE_CASES)
def test_each_feature_fires_where_it_should_and_nowhere_else(
    text: str, history: list[Turn], expected: set[str]
) -> None:
    features = extract_features(text, history, off_brand_words=RENOVATION.off_brand_words)
    assert set(features) == set(FEATURE_NAMES)
    assert all(0.0 <= v <= 1.0 for v in features.values()), features
    fired = {name for name, value in features.items() if value > 0}
    assert fired == expected, features


def test_graded_features() -> None:
    assert extract_features("Could we visit you?", PLAIN)["next_step"] == 0.5
    half = " ".join(["word"] * 67)  # halfway between LONG_WORDS (45) and twice as many
    assert extract_features(half, PLAIN)["too_long"] == pytest.approx(22 / 45)
    partial = extract_features("We renovate bathrooms.", KITCHEN_ASKED)["answers_question"]
    assert partial == pytest.approx(0.5)  # "renovate" of {"renovate", "kitchens"}
    hard = "Buy now!"
    once = extract_features(hard, PLAIN)["pushy"]
    again = extract_features(hard, [*PLAIN, ("business", hard), ("customer", "No.")])["pushy"]
    assert 0 < once < again, "repeating the hard sell is pushier"
    assert extract_features("Price: 9,000 euros.", PRICE_STATED)["price_before_need"] == 0.0
    assert not is_needs_question("Which day works for you?")
    assert not is_needs_question("What is your budget, the price is 9,000 euros?")
    assert is_needs_question("Which room is it?", RENOVATION.needs_phrases)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_texts_read_as_written_by_people(name: str) -> None:
    scenario = SCENARIOS[name]
    lines = scenario.customer
    openings = [q for need in scenario.personas.needs for q in need.openings]
    texts = [
        *(t for q in (*openings, *scenario.concerns) for t in (q.text, q.answer)),
        *(d for need in scenario.personas.needs for d in need.details),
        *lines.accept,
        *lines.decline,
        *lines.filler,
        *lines.nudge,
        *(r.format(question="Why?") for r in lines.reask),
        *(t for goodbyes in lines.leave.values() for t in goodbyes),
        *scenario.rep.needs_questions,
        *scenario.rep.next_steps,
        *scenario.rep.poor_messages,
    ]
    assert [t for t in texts if extract_features(t, PLAIN)["garbled"]] == []
    # Only real questions carry a question mark: one makes the business owe an answer.
    assert not any("?" in t for t in (*lines.accept, *lines.decline, *lines.filler, *lines.nudge))


def test_a_scenario_with_a_mistake_is_refused_at_once() -> None:
    dynamics = dataclasses.replace(RENOVATION.dynamics, outcome_weights={"friendliness": 1.0})
    with pytest.raises(ValueError, match=re.escape("unknown features ['friendliness']")):
        dataclasses.replace(RENOVATION, dynamics=dynamics)
    with pytest.raises(ValueError, match=re.escape("rep.accept=1.5")):
        dataclasses.replace(RENOVATION, rep=dataclasses.replace(RENOVATION.rep, accept=1.5))


# -- agents ----------------------------------------------------------------------------------


def test_rep_never_sends_an_off_brand_or_too_long_suggestion_verbatim() -> None:
    off_brand = "Sure dude, we can do a cheap kitchen for you."
    seen: Counter[str] = Counter()
    for seed in range(300):
        rep = SimulatedRep(RENOVATION, random.Random(seed))
        for suggestion in (off_brand, LONG):
            action = rep.respond(suggestion, PLAIN)
            seen[action.decision] += 1
            assert action.decision in {"edit", "reject", "silent"}
            if action.decision == "edit":
                assert action.text is not None
                assert (
                    extract_features(action.text, PLAIN, off_brand_words=("dude", "cheap"))[
                        "off_brand"
                    ]
                    == 0
                )
                assert len(action.text.split()) < len(suggestion.split())
    assert seen["edit"] and seen["reject"]


def test_customer_resolves_a_concern_only_when_it_is_answered() -> None:
    scenario = RENOVATION
    concern = scenario.concerns[0]
    for seed in range(100):
        p_outcome = {}
        for how, reply in (("answered", concern.answer), ("ignored", "We are very flexible.")):
            customer = SimulatedCustomer(scenario, random.Random(seed))  # the same persona
            customer.open_concerns, customer.pending = [concern], concern
            history: list[Turn] = [("customer", concern.text)]
            p_outcome[how] = customer.react(
                f"{reply} {scenario.rep.next_steps[0]}", history
            ).p_outcome
            assert (concern in customer.open_concerns) == (how == "ignored")
        assert p_outcome["answered"] > p_outcome["ignored"], seed


# -- determinism -----------------------------------------------------------------------------


def _abstain(conversation: list[Turn]) -> str | None:
    return None


def _transcripts(scenario: Scenario, seed: int, policy: Policy) -> list[Any]:
    report = simulate_offline(scenario, 30, seed, policy)
    return [(r.transcript, r.end_reason, r.outcome, r.persona) for r in report.records]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_seed_same_conversations(name: str) -> None:
    scenario = SCENARIOS[name]
    good = good_policy(scenario)
    assert _transcripts(scenario, 7, good) == _transcripts(scenario, 7, good)
    assert _transcripts(scenario, 7, _abstain) == _transcripts(scenario, 7, _abstain)
    assert _transcripts(scenario, 7, good) != _transcripts(scenario, 8, good)


def test_runs_agree_across_processes_with_different_hash_seeds() -> None:
    code = (
        "import hashlib, sys; from services.simulator.runner import simulate_offline; "
        "from services.simulator.scenarios import SCENARIOS; "
        "r = [simulate_offline(s, 40, 3, lambda c: None).records for s in SCENARIOS.values()]; "
        "sys.stdout.write(hashlib.sha256(repr(r).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(digests) == 1


# -- the sanity check: what the business sends changes the outcome ----------------------------


def good_policy(scenario: Scenario) -> Policy:
    """Answers what was asked, asks about needs first, then proposes a concrete step; polite,
    concise."""

    def good(conversation: list[Turn]) -> str | None:
        last = next((text for role, text in reversed(conversation) if role == "customer"), "")
        answer = scenario.known_answer(last)
        asked_needs = any(
            is_needs_question(text, scenario.needs_phrases)
            for role, text in conversation
            if role == "business"
        )
        follow_up = scenario.rep.next_steps[0] if asked_needs else scenario.rep.needs_questions[0]
        return f"{answer} {follow_up}" if answer else f"Thanks! {follow_up}"

    return good


def bad_policy(conversation: list[Turn]) -> str | None:
    """Pushes a price at once, long, pushy and rude."""
    return (
        "Our price is 9,999 for everything and it is the best deal in town, buy now! This offer "
        "is limited and ends today, so act now and don't miss it. Obviously we are better than "
        "everybody else, trust me, we have been doing this for years and years and every single "
        "customer of ours has always been extremely happy with everything we did for them, so "
        "just buy now before the price goes up again."
    )


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_good_policy_clearly_beats_bad_policy(name: str) -> None:
    scenario = SCENARIOS[name]
    good = simulate_offline(scenario, 400, 0, good_policy(scenario)).outcome_rate
    rep_alone = simulate_offline(scenario, 400, 0, _abstain).outcome_rate
    bad = simulate_offline(scenario, 400, 0, bad_policy).outcome_rate
    rates = f"{name}: good {good:.3f}, rep alone {rep_alone:.3f}, bad {bad:.3f}"
    assert good - bad >= 0.15, rates
    # The rep alone sits in between, so a learned policy has room to improve on it.
    assert bad < rep_alone < good, rates


def test_score_is_the_weighted_features_of_the_message() -> None:
    scenario = RENOVATION
    d = scenario.dynamics
    for text, history, _ in FEATURE_CASES:
        f = extract_features(
            text,
            history,
            off_brand_words=scenario.off_brand_words,
            extra_needs_phrases=scenario.needs_phrases,
        )
        expected = 0.0
        for name in FEATURE_NAMES:  # the slow, obvious version
            expected += d.outcome_weights.get(name, 0.0) * f[name]
            expected -= d.outcome_annoyance * d.leave_weights.get(name, 0.0) * f[name]
        assert scenario.score(text, history) == pytest.approx(expected, abs=1e-12), text


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_score_ranks_the_good_policy_above_the_bad_one(name: str) -> None:
    scenario = SCENARIOS[name]
    good = simulate_offline(scenario, 40, 1, good_policy(scenario))
    bad = simulate_offline(scenario, 40, 1, bad_policy)
    good_scores = [s for r in good.records for s in r.suggestion_scores]
    bad_scores = [s for r in bad.records for s in r.suggestion_scores]
    # One score per suggestion shown: every business turn asks for one offline.
    assert len(good_scores) == sum(r.turns for r in good.records)
    assert min(good_scores) > max(bad_scores)


# -- through the real API --------------------------------------------------------------------


@pytest.fixture
def served(
    sqlite_store: Store,
    tiny_model: Path,
    tiny_adapters: dict[str, Path],
    tiny_backend: EmbeddedBackend,
) -> Iterator[tuple[TestClient, str]]:
    """A business with a two-arm experiment on the tiny model's adapters, and its API."""
    business, key = sqlite_store.business_key()
    suffix = uuid.uuid4().hex[:6]
    with session_scope(sqlite_store.factory) as session:
        for arm, adapter in (("control", "zero"), ("treatment", "noisy")):
            register_policy(
                session,
                policy_id=f"sim-{arm}-{suffix}",
                base_model=str(tiny_model),
                adapter_uri=str(tiny_adapters[adapter]),
                status=PolicyStatus.APPROVED,
            )
        create_experiment(
            session,
            name="sim",
            business_id=business,
            arms=[
                ArmSpec("control", f"sim-control-{suffix}", 1.0),
                ArmSpec("treatment", f"sim-treatment-{suffix}", 1.0),
            ],
        )
    settings = sqlite_store.settings.model_copy(update={"temperature": 0.0, "max_new_tokens": 8})
    with TestClient(create_app(settings, backend=tiny_backend)) as client:
        yield client, key


def test_conversations_through_the_api_are_logged_as_the_report_says(
    served: tuple[TestClient, str],
) -> None:
    client, key = served
    scenario = dataclasses.replace(SCENARIOS["renovation"], max_turns=4)
    progress: list[tuple[int, int]] = []
    report = run_conversations(
        client, key, scenario, 5, seed=4, progress=lambda i, n: progress.append((i, n))
    )
    assert progress[-1] == (5, 5) and len(report.records) == 5
    # The tiny random model writes gibberish, which the rep always replaces by its own words,
    # so the API run replays the offline run in which the policy abstains (seed 4 has
    # outcomes, a customer leaving and a timeout); the same dynamics, through the real API.
    offline = simulate_offline(scenario, 5, 4, _abstain)
    for online, played in zip(report.records, offline.records, strict=True):
        if online.accepted == online.edited == 0:
            assert online.transcript == played.transcript
    assert any(r.outcome for r in report.records)
    relations: Counter[str] = Counter()
    for record in report.records:
        stored = client.get(f"/v1/conversations/{record.conversation_id}", headers=auth(key))
        assert stored.status_code == 200, stored.text
        body = stored.json()
        assert body["status"] == "closed" and body["end_reason"] == record.end_reason
        assert [(m["role"], m["text"]) for m in body["messages"]] == list(record.transcript)
        assert bool(body["outcomes"]) == record.outcome == (record.end_reason == "outcome")
        if record.outcome:
            assert body["outcomes"][0]["label"] == scenario.outcome_label
            assert body["outcomes"][0]["seq"] == body["message_count"]
        suggestions = {s["id"]: s for s in body["suggestions"]}
        assert record.suggestion_errors == 0 and len(suggestions) == record.turns
        assert record.arm in {"control", "treatment"}
        assert {s["arm"] for s in suggestions.values()} == {record.arm}
        assert {s["policy_version"] for s in suggestions.values()} == {record.policy}
        linked = [m for m in body["messages"] if m["suggestion_id"] is not None]
        assert all(m["role"] == "business" and m["suggestion_id"] in suggestions for m in linked)
        assert all(m["suggestion_relation"] is not None for m in linked)
        assert len(linked) + record.silences == len(suggestions)
        counted = Counter(m["suggestion_relation"] for m in linked)
        assert (
            counted
            == Counter(
                {
                    "accepted": record.accepted,
                    "edited": record.edited,
                    "rejected": record.rejected,
                    "abstained": record.abstained,
                }
            )
            - Counter()
        )  # drops zero counts
        relations.update(counted)
    assert sum(relations.values()) > 0
    arms = report.by_arm()
    assert set(arms) <= {"control", "treatment"}
    assert sum(a.conversations for a in arms.values()) == 5
