"""Monte Carlo returns computed by the database equal a plain Python loop, on both stores."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.conversations.jsonl import import_lines
from services.conversations.repository import decision_returns
from services.db import session_scope, utcnow
from services.iterations.dataset import build_examples
from services.policies.prompt import ABSTAIN_MARKER
from tests.conftest import Store
from workers.learning.returns import ReturnsConfig, monte_carlo_returns, per_decision_is_returns

message = st.tuples(st.sampled_from(["customer", "business"]), st.booleans())
conversation = st.lists(message, min_size=1, max_size=12)


def python_returns(messages: list[tuple[str, bool]], gamma: float) -> list[float]:
    """The definition, by hand: reward of decision t = an outcome at or after business message
    t and before business message t+1; G_t = sum_j gamma^j r_{t+j+1}."""
    decisions = [i for i, (role, _) in enumerate(messages) if role == "business"]
    rewards = []
    for k, start in enumerate(decisions):
        end = decisions[k + 1] if k + 1 < len(decisions) else len(messages)
        rewards.append(1.0 if any(flag for _, flag in messages[start:end]) else 0.0)
    returns = []
    for t in range(len(rewards)):
        returns.append(sum(gamma**j * rewards[t + j] for j in range(len(rewards) - t)))
    return returns


def test_monte_carlo_returns_by_hand() -> None:
    assert monte_carlo_returns([0, 0, 1], 0.5) == [0.25, 0.5, 1.0]
    assert monte_carlo_returns([1, 0, 1], 1.0) == [2.0, 1.0, 1.0]
    assert per_decision_is_returns([0, 0, 1], [1, 1, 1], 0.5) == [0.25, 0.5, 1.0]
    # rho after t scales what follows; rho of t itself does not matter.
    assert per_decision_is_returns([0, 0, 1], [9, 2, 0], 0.5) == [0.0, 0.0, 1.0]
    assert per_decision_is_returns([0, 1, 1], [9, 2, 3], 1.0) == [2 * (1 + 3), 1 + 3, 1.0]


def test_returns_config_is_validated() -> None:
    for bad in ({"gamma": 0.0}, {"gamma": 1.5}, {"importance_clip": 0.5}, {"window_days": -1}):
        with pytest.raises(ValueError):
            ReturnsConfig(**bad)  # type: ignore[arg-type]


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(conversation, min_size=1, max_size=8), st.sampled_from([1.0, 0.9, 0.5, 0.01]))
def test_sql_returns_equal_the_python_loop(
    store: Store, conversations: list[list[tuple[str, bool]]], gamma: float
) -> None:
    business = f"ret-{uuid.uuid4().hex[:8]}"
    lines = []
    for i, messages in enumerate(conversations):
        lines.append(
            json.dumps(
                {
                    "id": f"c{i}",
                    "business_id": business,
                    "end": "customer_left",
                    "messages": [
                        {"role": r, "text": f"m{j}", **({"outcome": True} if flag else {})}
                        for j, (r, flag) in enumerate(messages)
                    ],
                }
            )
        )
    with session_scope(store.factory) as session:
        assert import_lines(session, lines, settings=store.settings).ok
    with session_scope(store.factory) as session:
        from services.conversations.repository import get_conversation_by_external_id

        for i, messages in enumerate(conversations):
            stored = get_conversation_by_external_id(
                session, business_id=business, external_id=f"c{i}"
            )
            assert stored is not None
            rows = decision_returns(session, conversation_ids=[stored.id], gamma=gamma)
            expected = python_returns(messages, gamma)
            assert [r["step"] for r in rows] == list(range(len(expected)))
            assert [float(r["ret"]) for r in rows] == pytest.approx(expected, abs=1e-9)


def test_dataset_actions_abstentions_and_unlogged(store: Store) -> None:
    business = f"ds-{uuid.uuid4().hex[:8]}"
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
    cases = {
        "as_action": ["Hi there!", ABSTAIN_MARKER, "Thanks!"],
        "business_message": ["Hi there!", "It is 10 dollars.", "Thanks!"],
        "drop": ["Hi there!", "Thanks!"],
    }
    for abstentions, actions in cases.items():
        config = ReturnsConfig(gamma=0.5, business_id=business, abstentions=abstentions)  # type: ignore[arg-type]
        with session_scope(store.factory) as session:
            examples, stats = build_examples(session, config=config, policy_id=None, cutoff=later)
        assert [e.action for e in examples] == actions
        assert stats.conversations == 1 and stats.decisions == 3
    with session_scope(store.factory) as session:
        examples, _ = build_examples(
            session,
            config=ReturnsConfig(gamma=0.5, business_id=business),
            policy_id=None,
            cutoff=later,
        )
    assert [e.ret for e in examples] == [0.5, 1.0, 0.0]
    assert [len(e.state) for e in examples] == [1, 3, 5]
    assert all(e.outcome == 1 and e.n_steps == 3 for e in examples)
    assert examples[1].state[-1].text == "price?"
    with session_scope(store.factory) as session:
        none, _ = build_examples(
            session,
            config=ReturnsConfig(business_id=business),
            policy_id=None,
            cutoff=later - timedelta(days=1),
        )
    assert none == [], "conversations ended after the cutoff are not in the window"
