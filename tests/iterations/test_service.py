"""The iteration state machine on both stores: leases, idempotent steps, operator actions."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from services.db import session_scope, utcnow
from services.errors import Conflict, Invalid
from services.iterations import repository, service
from services.iterations.models import PIPELINE, Step
from services.iterations.schemas import parse_iteration_request
from services.policies.models import PolicyStatus
from services.policies.service import register_policy
from tests.conftest import Store


def _policy(store: Store) -> str:
    policy = f"p-{uuid.uuid4().hex[:8]}"
    with session_scope(store.factory) as session:
        register_policy(
            session,
            policy_id=policy,
            base_model="/m",
            adapter_uri="/a",
            status=PolicyStatus.APPROVED,
        )
    return policy


def _iteration(store: Store, **data: object) -> str:
    policy = _policy(store)
    request = parse_iteration_request(
        {
            "algorithm": "ppo",
            "hyperparameters": {"beta": 0.1, "n_epochs": 2},
            "data": dict(data),
            "parent_policy_id": policy,
        }
    )
    with session_scope(store.factory) as session:
        return service.create_iteration(session, settings=store.settings, request=request).id


def _begin(store: Store, iteration_id: str, step: Step, lease_s: float = 60) -> str:
    with session_scope(store.factory) as session:
        return service.begin_step(
            session, iteration_id=iteration_id, step=step, worker="w", lease_s=lease_s
        ).action


def _finish(store: Store, iteration_id: str, step: Step) -> Step | None:
    with session_scope(store.factory) as session:
        return service.finish_step(
            session,
            iteration_id=iteration_id,
            step=step,
            result={"ok": True},
            metrics={f"{step.value}_done": 1},
        )


def test_configs_are_resolved_and_stored(store: Store) -> None:
    iteration_id = _iteration(store, gamma=0.9, max_prompts=8)
    with session_scope(store.factory) as session:
        it = service.get_iteration(session, iteration_id=iteration_id)
        assert it.configs["improve"]["beta"] == 0.1 and it.configs["improve"]["n_ppo_epochs"] == 2
        assert it.configs["returns"]["gamma"] == 0.9
        assert it.configs["pipeline"]["max_prompts"] == 8
        assert it.configs["pipeline"]["ab_weight"] == 0.5, "defaults are resolved and stored"
        assert it.configs["q"]["base_model"] == "/m"
        assert it.status == "queued" and it.current_step == "returns"


@pytest.mark.parametrize(
    ("algorithm", "hyper", "data", "words"),
    [
        ("sft", {}, {}, "algorithm"),
        ("ppo", {"beta": -1}, {}, "beta"),
        ("ppo", {"no_such_knob": 1}, {}, "no_such_knob"),
        ("ppo", {}, {"gamma": 2}, "gamma"),
        ("ppo", {}, {"colour": "red"}, "colour"),
        ("ppo", {"q": {"kind": "forest"}}, {}, "kind"),
        ("ppo", {}, {"ab_weight": 1.5}, "ab_weight"),
        ("ppo", {"gamma": 0.9}, {"gamma": 0.8}, "gamma"),
    ],
)
def test_bad_requests_are_refused_by_name(
    store: Store,
    algorithm: str,
    hyper: dict,
    data: dict,
    words: str,  # type: ignore[type-arg]
) -> None:
    policy = _policy(store)
    raw = {
        "algorithm": algorithm,
        "hyperparameters": hyper,
        "data": data,
        "parent_policy_id": policy,
    }
    with pytest.raises(Invalid, match=words), session_scope(store.factory) as session:
        service.create_iteration(
            session, settings=store.settings, request=parse_iteration_request(raw)
        )


def test_steps_run_once_in_order_and_stop_for_approval(store: Store) -> None:
    iteration_id = _iteration(store)
    assert _begin(store, iteration_id, Step.FIT_Q) == "skip", "not this step's turn"
    for step in PIPELINE:
        assert _begin(store, iteration_id, step) == "run"
        assert _begin(store, iteration_id, step) == "wait", "a live lease holds the step"
        following = _finish(store, iteration_id, step)
        assert _finish(store, iteration_id, step) is None, "a duplicate finish advances nothing"
        assert _begin(store, iteration_id, step) == "skip", "done steps are skipped"
        expected = PIPELINE[PIPELINE.index(step) + 1] if step is not PIPELINE[-1] else None
        assert following == expected
    with session_scope(store.factory) as session:
        it = service.get_iteration(session, iteration_id=iteration_id)
        assert it.status == "awaiting_approval" and it.current_step == "deploy"
        assert set(it.metrics) == {f"{s.value}_done" for s in PIPELINE}
        assert _begin(store, iteration_id, Step.DEPLOY) == "skip", "deploy waits for approval"
        service.approve(session, iteration_id=iteration_id)
    with session_scope(store.factory) as session, pytest.raises(Conflict, match="queued"):
        service.approve(session, iteration_id=iteration_id)


def test_expired_lease_is_taken_over(store: Store) -> None:
    iteration_id = _iteration(store)
    assert _begin(store, iteration_id, Step.RETURNS, lease_s=60) == "run"
    with session_scope(store.factory) as session:
        row = repository.get_step(session, iteration_id=iteration_id, step="returns")
        assert row is not None
        row.lease_expires_at = utcnow() - timedelta(seconds=1)  # its worker died
    assert _begin(store, iteration_id, Step.RETURNS) == "run"
    with session_scope(store.factory) as session:
        row = repository.get_step(session, iteration_id=iteration_id, step="returns")
        assert row is not None and row.attempts == 2
        kinds = [e.kind for e in service.get_iteration(session, iteration_id=iteration_id).events]
        assert "takeover" in kinds


def test_failure_retry_approve_and_reject(store: Store) -> None:
    iteration_id = _iteration(store)
    _begin(store, iteration_id, Step.RETURNS)
    with session_scope(store.factory) as session:
        service.fail_step(session, iteration_id=iteration_id, step=Step.RETURNS, error="boom")
    with session_scope(store.factory) as session:
        it = service.get_iteration(session, iteration_id=iteration_id)
        assert it.status == "failed" and "boom" in (it.error or "")
        assert service.retry(session, iteration_id=iteration_id, override_gate=True) is Step.RETURNS
    for step in PIPELINE:
        assert _begin(store, iteration_id, step) == "run"
        _finish(store, iteration_id, step)
    with session_scope(store.factory) as session:
        it = service.get_iteration(session, iteration_id=iteration_id)
        assert it.override_gate and it.status == "awaiting_approval"
        service.approve(session, iteration_id=iteration_id)
    assert _begin(store, iteration_id, Step.DEPLOY) == "run"
    assert _finish(store, iteration_id, Step.DEPLOY) is None
    with session_scope(store.factory) as session:
        assert service.get_iteration(session, iteration_id=iteration_id).status == "succeeded"

    other = _iteration(store)
    with session_scope(store.factory) as session:
        service.cancel(session, iteration_id=other)
    assert _begin(store, other, Step.RETURNS) == "skip", "cancelled iterations do no work"


def test_cancel_stops_a_running_step_at_its_next_progress_report(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import pipeline

    iteration_id = _iteration(store)
    reports: list[float] = []

    def slow_returns(ctx: pipeline.Context) -> tuple[dict[str, object], dict[str, object]]:
        ctx.progress(0.1)
        reports.append(0.1)
        with session_scope(store.factory) as session:  # an operator cancels meanwhile
            service.cancel(session, iteration_id=iteration_id, actor="op-key")
        for fraction in (0.5, 0.9):
            ctx.progress(fraction)
            reports.append(fraction)
        return {"never": True}, {}

    monkeypatch.setitem(pipeline.STEPS, Step.RETURNS, slow_returns)
    following = pipeline.run_step(store.factory, store.settings, iteration_id, Step.RETURNS)
    assert following is None and reports == [0.1]  # stopped at the first report after cancel
    with session_scope(store.factory) as session:
        iteration = service.get_iteration(session, iteration_id=iteration_id)
        assert iteration.status == "cancelled"
        step = repository.get_step(session, iteration_id=iteration_id, step=Step.RETURNS.value)
        assert step is not None and step.status == "failed"
        assert step.error == "cancelled by an operator"
        assert [e.kind for e in iteration.events][-2:] == ["cancelled", "step_stopped"]


def test_an_iteration_that_lost_its_step_message_is_found_stalled(store: Store) -> None:
    """Queued, untouched for longer than the broker keeps a message: its step was lost between
    commit and queue (a crash), and beat sends it again."""
    from datetime import timedelta

    from services.db import utcnow

    lost, fresh = _iteration(store), _iteration(store)
    with session_scope(store.factory) as session:
        service.get_iteration(session, iteration_id=lost).updated_at = utcnow() - timedelta(hours=2)
    with session_scope(store.factory) as session:
        stalled = dict(service.stalled_iterations(session, older_than_s=3600))
    assert stalled.get(lost) == Step.RETURNS and fresh not in stalled
