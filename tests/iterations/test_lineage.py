"""The loop advances by itself: two automatic iterations in a row make pi_1 then pi_2, pi_2's
parent is pi_1 (not the A/B's control by a tie of weights), and each deploy keeps the scope's
exploration settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.db import session_scope
from services.experiments import repository as experiments
from services.experiments.service import ArmSpec, create_experiment
from services.iterations import service
from services.iterations.models import Step
from services.iterations.triggers import maybe_start_iteration
from services.migrate import upgrade
from services.policies import service as policies
from services.policies.models import PolicyStatus
from services.tenants.service import ensure_business
from tests.conftest import Store, _store
from tests.iterations.scenario import write_policy_logs
from workers.pipeline import run_inline

EXPLORATION = {
    "epsilon": 0.2,
    "personas": [
        {"name": "brief", "instruction": "Be brief."},
        {"name": "warm", "instruction": "Be warm."},
    ],
}


@pytest.fixture
def fresh_store(tmp_path: Path) -> Iterator[Store]:
    """A database of its own: beat looks at every business and every iteration."""
    url = f"sqlite:///{tmp_path / 'lineage.sqlite3'}"
    upgrade(url)
    yield from _store("sqlite", url, tmp_path)


def _run_to_approval(store: Store, iteration_id: str) -> None:
    settings = store.settings
    run_inline(store.factory, settings, iteration_id, Step.RETURNS)
    with session_scope(store.factory) as session:
        iteration = service.get_iteration(session, iteration_id=iteration_id)
        gate = iteration.status == "failed" and iteration.current_step == "evaluate_q"
    if gate:  # a dozen conversations may hold out one class only: the operator overrides
        with session_scope(store.factory) as session:
            step = service.retry(session, iteration_id=iteration_id, override_gate=True)
        run_inline(store.factory, settings, iteration_id, step)
    with session_scope(store.factory) as session:
        iteration = service.get_iteration(session, iteration_id=iteration_id)
        assert iteration.status == "awaiting_approval", iteration.error
        service.approve(session, iteration_id=iteration_id)
    run_inline(store.factory, settings, iteration_id, Step.DEPLOY)


def test_two_automatic_iterations_advance_the_lineage(
    fresh_store: Store, tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    store = fresh_store
    store.settings = store.settings.model_copy(
        update={"beat_min_new_conversations": 10, "task_runner": "inline"}
    )
    business = "lineage"
    with session_scope(store.factory) as session:
        ensure_business(session, business_id=business)
        policies.register_policy(
            session,
            policy_id="pi0",
            base_model=str(tiny_model),
            adapter_uri=str(tiny_adapters["zero"]),
            status=PolicyStatus.APPROVED,
        )
        create_experiment(
            session, name="pi0", arms=[ArmSpec("control", "pi0", 1.0)], exploration=EXPLORATION
        )
    write_policy_logs(store, business, "pi0", 24, epsilon=0.2)

    with session_scope(store.factory) as session:
        first = maybe_start_iteration(session, settings=store.settings)
    assert first is not None
    _run_to_approval(store, first)
    with session_scope(store.factory) as session:
        it1 = service.get_iteration(session, iteration_id=first)
        assert it1.status == "succeeded", it1.error
        assert it1.parent_policy_id == "pi0"
        pi1 = it1.candidate_policy_id
        assert pi1 is not None
        ab = experiments.running_for_scope(session, scope="*")
        assert ab is not None and ab.exploration == EXPLORATION
        assert {a.name: (a.policy_id, a.weight) for a in ab.arms} == {
            "control": ("pi0", 0.5),
            "treatment": (pi1, 0.5),
        }
        assert service.current_policy(session, business_id=None) == pi1
        assert it1.metrics["data_policy"] > 0 and it1.metrics["data_ess"] > 0

    # The A/B collects the next batch: both arms log; Q^{pi_1} learns from pi_1's decisions.
    write_policy_logs(store, business, pi1, 12, seed=1, epsilon=0.2)
    write_policy_logs(store, business, "pi0", 12, seed=2, epsilon=0.2)
    with session_scope(store.factory) as session:
        second = maybe_start_iteration(session, settings=store.settings)
    assert second is not None
    _run_to_approval(store, second)
    with session_scope(store.factory) as session:
        it2 = service.get_iteration(session, iteration_id=second)
        assert it2.status == "succeeded", it2.error
        assert it2.parent_policy_id == pi1
        pi2 = it2.candidate_policy_id
        assert pi2 is not None and pi2 != pi1
        chain = [p.id for p in policies.lineage(session, policy_id=pi2)]
        assert chain == [pi2, pi1, "pi0"]
        print("parent chain:", " -> ".join(chain))  # for the record, with -s
        # pi_0's 36 conversations are another arm's data now, not Q^{pi_1}'s.
        assert it2.metrics["data_policy"] + it2.metrics["data_exploration"] <= 12
        assert it2.metrics["data_other_arms_available"] == 36
        ab = experiments.running_for_scope(session, scope="*")
        assert ab is not None and ab.exploration == EXPLORATION
        assert {a.policy_id for a in ab.arms} == {pi1, pi2}
