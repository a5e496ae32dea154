"""Decisions and their returns: the database against the paper's definition, on both stores;
sources, states, off-policy weights and the effective sample size against hand computations."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.conversations import service as log
from services.conversations.jsonl import import_lines
from services.conversations.models import EndReason, Speaker
from services.conversations.repository import decision_returns
from services.db import session_scope, utcnow
from services.iterations.dataset import DatasetStats, build_examples, iter_decisions
from services.policies.prompt import ABSTAIN_MARKER
from services.tenants.service import ensure_business
from tests.conftest import Store
from workers.learning.returns import (
    ReturnsConfig,
    effective_sample_size,
    exploration_ratio,
    importance_weights,
)

# -- the definition, by hand ----------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One step of a generated timeline: a customer or business message, a suggestion for the
    current state (answered by the next business message or not), or an outcome observed now."""

    kind: str  # "customer" | "business" | "suggest" | "outcome"
    answered: bool = False  # suggest: the next business message links it


def reference_decisions(events: list[Event], gamma: float) -> list[tuple[int, float, float]]:
    """(state_seq, reward, return) of each decision, from the definition (section 2.1).

    Walk the timeline. A decision is a suggestion (at the state it saw) or a business turn no
    suggestion answered (at the state before it). From a decision's state, play the episode
    forward: each business turn that starts is one step; the first outcome ends the episode
    with reward 1 on the step it follows. If the episode ends before any business turn acts
    after the decision, the decision never happened.
    """
    seq = 0
    roles: dict[int, str] = {}
    links: dict[int, int] = {}  # business message seq -> index of the suggestion it answers
    suggestions: list[int] = []  # state_seq of each suggestion, in order
    pending: int | None = None
    outcome_at: int | None = None
    for event in events:
        if event.kind == "suggest":
            suggestions.append(seq)
            if event.answered:
                pending = len(suggestions) - 1
        elif event.kind == "outcome":
            if seq >= 1 and outcome_at is None:
                outcome_at = seq
        else:
            seq += 1
            roles[seq] = event.kind
            if event.kind == "business" and pending is not None:
                links[seq] = pending
            pending = None if event.kind == "business" else pending
    starts = [s for s in sorted(roles) if roles[s] == "business" and roles.get(s - 1) != "business"]

    def turn_of(start: int) -> list[int]:
        run = [start]
        while roles.get(run[-1] + 1) == "business":
            run.append(run[-1] + 1)
        return run

    decisions = [(state, "suggestion", i) for i, state in enumerate(suggestions)]
    decisions += [
        (start - 1, "turn", start)
        for start in starts
        if not any(m in links for m in turn_of(start))
    ]
    decisions.sort(key=lambda d: (d[0], d[1] != "suggestion", d[2]))
    out = []
    for state, _, _ in decisions:
        if outcome_at is None:
            out.append((state, 0.0, 0.0))
            continue
        steps = 0
        for s in range(state + 1, outcome_at + 1):
            if s in starts:
                steps += 1
        if steps == 0:
            continue  # the outcome came first: absorbed
        out.append((state, 1.0 if steps == 1 else 0.0, gamma ** (steps - 1)))
    return out


def write_timeline(store: Store, business: str, events: list[Event]) -> str:
    with session_scope(store.factory) as session:
        ensure_business(session, business_id=business)
        conversation = log.create_conversation(session, business_id=business).row.id
        pending: str | None = None
        count = 0
        for event in events:
            if event.kind == "suggest":
                sid = log.record_suggestion(
                    session,
                    settings=store.settings,
                    business_id=business,
                    conversation_id=conversation,
                    text=f"suggestion {count}",
                    policy_version="pi-test",
                ).row.id
                if event.answered:
                    pending = sid
            elif event.kind == "outcome":
                if count >= 1:
                    log.record_outcome(session, business_id=business, conversation_id=conversation)
            else:
                link = pending if event.kind == "business" else None
                log.append_message(
                    session,
                    settings=store.settings,
                    business_id=business,
                    conversation_id=conversation,
                    role=Speaker(event.kind),
                    text=f"{event.kind} {count}",
                    suggestion_id=link,
                )
                count += 1
                pending = None if event.kind == "business" else pending
        log.close_conversation(
            session,
            business_id=business,
            conversation_id=conversation,
            reason=EndReason.TIMEOUT,
        )
    return conversation


events = st.lists(
    st.one_of(
        st.just(Event("customer")),
        st.just(Event("business")),
        st.builds(Event, st.just("suggest"), st.booleans()),
        st.just(Event("outcome")),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(events, min_size=1, max_size=4), st.sampled_from([1.0, 0.9, 0.5, 0.01]))
def test_sql_returns_equal_the_definition(
    store: Store, timelines: list[list[Event]], gamma: float
) -> None:
    business = f"ret-{uuid.uuid4().hex[:8]}"
    ids = [write_timeline(store, business, timeline) for timeline in timelines]
    with session_scope(store.factory) as session:
        rows = decision_returns(session, conversation_ids=ids, gamma=gamma)
    for conversation_id, timeline in zip(ids, timelines, strict=True):
        got = [
            (int(r["state_seq"]), float(r["reward"]), float(r["ret"]))
            for r in rows
            if r["conversation_id"] == conversation_id and not r["after_outcome"]
        ]
        expected = reference_decisions(timeline, gamma)
        assert [g[0] for g in got] == [e[0] for e in expected]
        assert [g[1] for g in got] == [e[1] for e in expected]
        assert [g[2] for g in got] == pytest.approx([e[2] for e in expected], abs=1e-9)
        assert all(0.0 <= g[2] <= 1.0 for g in got)


def test_the_outcome_absorbs(store: Store) -> None:
    """The old code made a post-outcome 'Thanks!' a decision (G = 0, outcome = 1)."""
    c, b = Event("customer"), Event("business")
    timeline = [c, b, c, b, Event("outcome"), c, Event("suggest"), b, Event("outcome"), c, b]
    conversation = write_timeline(store, f"abs-{uuid.uuid4().hex[:8]}", timeline)
    with session_scope(store.factory) as session:
        rows = decision_returns(session, conversation_ids=[conversation], gamma=0.5)
    kept = [
        (r["state_seq"], float(r["reward"]), float(r["ret"]))
        for r in rows
        if not r["after_outcome"]
    ]
    assert kept == [(1, 0.0, 0.5), (3, 1.0, 1.0)]
    assert sum(1 for r in rows if r["after_outcome"]) == 3  # the suggestion and two turns after

    # An outcome before the first business message: no decisions at all.
    early = write_timeline(
        store, f"abs-{uuid.uuid4().hex[:8]}", [c, Event("suggest"), Event("outcome"), b, c, b]
    )
    with session_scope(store.factory) as session:
        rows = decision_returns(session, conversation_ids=[early], gamma=1.0)
    assert rows and all(r["after_outcome"] for r in rows)


def test_consecutive_business_messages_are_one_turn(store: Store) -> None:
    c, b = Event("customer"), Event("business")
    conversation = write_timeline(
        store, f"run-{uuid.uuid4().hex[:8]}", [c, b, b, c, b, Event("outcome")]
    )
    with session_scope(store.factory) as session:
        rows = decision_returns(session, conversation_ids=[conversation], gamma=0.5)
    assert [(r["state_seq"], r["turn"], float(r["ret"])) for r in rows] == [
        (1, 0, 0.5),
        (4, 1, 1.0),
    ]


# -- weights, by hand -------------------------------------------------------------------------


def test_importance_weights_by_hand() -> None:
    eps = 0.2
    plain, persona = exploration_ratio(False, 1 - eps), exploration_ratio(True, eps / 3)
    assert plain == pytest.approx(1.25) and persona == 0.0
    states = [1, 3, 5, 7]
    executed = [(1, plain), (3, plain), (5, plain), (7, plain)]
    # Decision at state 1 depends on the choices at 3, 5, 7: 1.25^3.
    assert importance_weights(states, executed, estimator="weighted", clip=10.0) == pytest.approx(
        [1.25**3, 1.25**2, 1.25, 1.0]
    )
    assert importance_weights(states, executed, estimator="weighted", clip=1.5) == pytest.approx(
        [1.5, 1.5, 1.25, 1.0]
    )
    assert importance_weights(states, executed, estimator="truncated", clip=10.0) == [1.0] * 4
    with_persona = [(1, plain), (3, persona), (5, plain), (7, plain)]
    assert importance_weights(
        states, with_persona, estimator="weighted", clip=10.0
    ) == pytest.approx([0.0, 1.25**2, 1.25, 1.0])
    # The case that gave a target of 50.6 before: epsilon 0.3 over 11 later turns. The return
    # stays in [0, 1]; the weight is bounded by the clip.
    eleven = [(k, exploration_ratio(False, 0.7)) for k in range(2, 13)]
    assert importance_weights([1], eleven, estimator="weighted", clip=10.0) == [10.0]
    assert effective_sample_size([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert effective_sample_size([2.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_sample_size([1.0, 3.0]) == pytest.approx(16 / 10)
    with pytest.raises(ValueError):
        exploration_ratio(False, 0.0)


def test_returns_config_is_validated() -> None:
    for bad in (
        {"gamma": 0.0},
        {"gamma": 1.5},
        {"importance_clip": 0.5},
        {"importance_clip": float("nan")},
        {"window_days": -1},
        {"sources": ()},
        {"sources": ("policy", "everything")},
        {"abstentions": "business_message"},
        {"off_policy": "ordinary"},
    ):
        with pytest.raises(ValueError):
            ReturnsConfig(**bad)  # type: ignore[arg-type]
    assert ReturnsConfig(sources=["imported", "policy"]).sources == ("imported", "policy")  # type: ignore[arg-type]


# -- the dataset: sources, states, actions, weights --------------------------------------------


def _suggest(
    store: Store, session: object, business: str, conversation: str, text: str | None, **kw: object
) -> str:
    return log.record_suggestion(
        session,  # type: ignore[arg-type]
        settings=store.settings,
        business_id=business,
        conversation_id=conversation,
        text=text,
        **kw,  # type: ignore[arg-type]
    ).row.id


def _say(
    store: Store,
    session: object,
    business: str,
    conversation: str,
    role: str,
    text: str,
    link: str | None = None,
) -> None:
    log.append_message(
        session,  # type: ignore[arg-type]
        settings=store.settings,
        business_id=business,
        conversation_id=conversation,
        role=Speaker(role),
        text=text,
        suggestion_id=link,
    )


def test_decisions_sources_states_and_weights(store: Store) -> None:
    business = f"src-{uuid.uuid4().hex[:8]}"
    eps = 0.2
    explore = {"name": "brief", "instruction": "Be brief."}
    with session_scope(store.factory) as session:
        ensure_business(session, business_id=business)
        cid = log.create_conversation(session, business_id=business).row.id
        s = lambda *a, **k: _suggest(store, session, business, cid, *a, **k)  # noqa: E731
        say = lambda *a, **k: _say(store, session, business, cid, *a, **k)  # noqa: E731
        say("customer", "hi")
        a1 = s("Hello!", policy_version="pi1", propensity=1 - eps)
        s("Hey, welcome!", policy_version="pi1", propensity=1 - eps)
        say("business", "Hello!", a1)
        say("customer", "price?")
        a2 = s("Ten dollars.", policy_version="pi1", persona=explore, propensity=eps)
        say("business", "It is ten dollars.", a2)
        say("business", "Shipping is free.")  # the same turn: not a decision of its own
        say("customer", "and the colour?")
        s(None, policy_version="pi1", propensity=1 - eps)  # abstained; the business writes
        say("business", "Blue.")
        say("customer", "hmm")
        s(None, policy_version="pi1", sampling_params={"fallback": "abstain_on_backend_error"})
        s("Buy now!", policy_version="pi0", propensity=1.0)  # another arm's (as if)
        a4 = s("Shall I book it?", policy_version="pi1", propensity=1 - eps)
        say("business", "Shall I book it?", a4)
        say("customer", "yes")
        log.record_outcome(session, business_id=business, conversation_id=cid)
        s("Thanks!", policy_version="pi1", propensity=1 - eps)  # after the outcome
        say("business", "Thanks!")
        log.close_conversation(
            session, business_id=business, conversation_id=cid, reason=EndReason.OUTCOME
        )
        # A suggestion the business never answered: it went silent, the customer left.
        silent = log.create_conversation(session, business_id=business).row.id
        _say(store, session, business, silent, "customer", "anyone there?")
        _suggest(
            store,
            session,
            business,
            silent,
            "Welcome back!",
            policy_version="pi1",
            propensity=1 - eps,
        )
        log.close_conversation(
            session, business_id=business, conversation_id=silent, reason=EndReason.CUSTOMER_LEFT
        )
    later = utcnow() + timedelta(seconds=1)
    config = ReturnsConfig(gamma=0.5, business_id=business)
    with session_scope(store.factory) as session:
        stats = DatasetStats()
        decisions = list(
            iter_decisions(session, config=config, policy_id="pi1", cutoff=later, stats=stats)
        )
    by_action = {d.action: d for d in decisions if d.source != "backend_error"}
    assert [d.excluded for d in decisions if d.source == "backend_error"] == ["backend_error"]
    plain = 1 / (1 - eps)
    # State = what the suggestion saw; the unanswered one is a decision with its own return.
    assert [t.text for t in by_action["Hey, welcome!"].state] == ["hi"]
    assert by_action["Hey, welcome!"].source == "policy"
    assert by_action["Hey, welcome!"].ret == pytest.approx(0.125)  # 4 turns to the outcome
    welcome = by_action["Welcome back!"]
    assert welcome.used and welcome.ret == 0.0 and welcome.weight == 1.0
    # Later exploration zeroes the weight of what came before it (weighted IS)...
    for before in ("Hello!", "Hey, welcome!"):
        assert by_action[before].weight == 0.0 and by_action[before].excluded == "zero_weight"
    # ...the exploration decision itself is kept, weighted by the later plain choices.
    ten = by_action["Ten dollars."]
    assert ten.source == "exploration" and ten.used
    assert ten.weight == pytest.approx(plain)  # the abstention is not executed; a4 is
    assert ten.ret == pytest.approx(0.25)
    assert [t.text for t in ten.state] == ["hi", "Hello!", "price?"]
    abstained = by_action[ABSTAIN_MARKER]
    assert abstained.source == "policy" and abstained.ret == pytest.approx(0.5)
    assert by_action["Shall I book it?"].ret == 1.0 and by_action["Shall I book it?"].reward == 1.0
    assert by_action["Buy now!"].source == "other_arms" and not by_action["Buy now!"].used
    assert by_action["Blue."].source == "unlogged"
    assert not by_action["Blue."].used  # opt-in source
    assert by_action["Thanks!"].excluded == "after_outcome"
    assert stats.excluded == {
        "after_outcome": 2,  # the suggestion and the business turn after the outcome
        "backend_error": 1,
        "source_other_arms": 1,
        "source_unlogged": 1,
        "zero_weight": 2,
    }
    assert stats.by_source["policy"] == {"available": 5, "used": 3}
    assert stats.by_source["exploration"] == {"available": 1, "used": 1}
    weights = [d.weight for d in decisions if d.used]
    assert stats.effective_sample_size == pytest.approx(
        sum(weights) ** 2 / sum(w * w for w in weights)
    )
    # Opting in: unlogged and other arms' decisions count with weight 1.
    wide = ReturnsConfig(
        gamma=0.5, business_id=business, sources=("policy", "unlogged", "other_arms")
    )  # type: ignore[arg-type]
    with session_scope(store.factory) as session:
        examples, wide_stats = build_examples(session, config=wide, policy_id="pi1", cutoff=later)
    assert {"Blue.", "Buy now!"} <= {e.action for e in examples}
    assert wide_stats.excluded["source_exploration"] == 1
    assert all(0.0 <= e.ret <= 1.0 for e in examples)


def test_imported_history_is_never_the_policys(store: Store) -> None:
    business = f"imp-{uuid.uuid4().hex[:8]}"
    record = {
        "id": "d1",
        "business_id": business,
        "end": "outcome",
        "messages": [
            {"role": "customer", "text": "hi"},
            {"role": "business", "text": "Hello! How can I help?", "suggestion": "Hi there!"},
            {"role": "customer", "text": "price?"},
            {"role": "business", "text": "It is 10 dollars.", "suggestion": None},
            {"role": "customer", "text": "ok buy", "outcome": True},
            {"role": "business", "text": "Thanks!"},
        ],
    }
    with session_scope(store.factory) as session:
        assert import_lines(session, [json.dumps(record)], settings=store.settings).ok
    later = utcnow() + timedelta(seconds=1)
    with session_scope(store.factory) as session:
        examples, stats = build_examples(
            session, config=ReturnsConfig(business_id=business), policy_id="pi0", cutoff=later
        )
    assert examples == [] and stats.excluded == {"after_outcome": 1, "source_imported": 2}
    config = ReturnsConfig(gamma=0.5, business_id=business, sources=("imported",))
    with session_scope(store.factory) as session:
        examples, stats = build_examples(session, config=config, policy_id="pi0", cutoff=later)
    assert [e.action for e in examples] == ["Hi there!", ABSTAIN_MARKER]
    assert [e.ret for e in examples] == [0.5, 1.0]
    assert [len(e.state) for e in examples] == [1, 3]
    assert stats.by_source["imported"] == {"available": 2, "used": 2}
    with session_scope(store.factory) as session:
        none, _ = build_examples(
            session, config=config, policy_id="pi0", cutoff=later - timedelta(days=1)
        )
    assert none == [], "conversations ended after the cutoff are not in the window"
