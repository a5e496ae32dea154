"""Experiments: creation, weights, stopping, and the conversation -> arm decision."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.audit import service as audit
from services.conversations.models import Conversation
from services.db import utcnow
from services.errors import Conflict, Invalid, NotFound
from services.experiments import repository
from services.experiments.assignment import choose_index, parse_personas, unit_interval
from services.experiments.models import GLOBAL_SCOPE, Arm, Assignment, Experiment
from services.policies import service as policies
from services.policies.models import Policy, PolicyStatus
from services.tenants import repository as tenants


@dataclass(frozen=True)
class ArmSpec:
    name: str
    policy_id: str
    weight: float


@dataclass(frozen=True)
class Served:
    """Which arm serves a conversation, and the policy behind it."""

    experiment: Experiment
    arm: Arm
    policy: Policy
    probability: float


def _validate_exploration(exploration: dict[str, Any] | None) -> None:
    if exploration is None:
        return
    try:
        epsilon, _ = parse_personas(exploration)
    except (KeyError, TypeError, ValueError) as exc:
        raise Invalid(
            f"exploration: {exc!r}; expected {{epsilon, personas: [{{name, instruction}}}}]}}}}"
        ) from None
    if not 0.0 <= epsilon <= 1.0:
        raise Invalid(f"exploration.epsilon must be in [0, 1], got {epsilon}")


def create_experiment(
    session: Session,
    *,
    name: str,
    arms: list[ArmSpec],
    business_id: str | None = None,
    unit: str = "conversation",
    exploration: dict[str, Any] | None = None,
    actor: str = audit.SYSTEM_ACTOR,
) -> Experiment:
    if not arms:
        raise Invalid("an experiment needs at least one arm")
    if len({a.name for a in arms}) != len(arms):
        raise Invalid("arm names must be unique within an experiment")
    if any(a.weight < 0 for a in arms) or sum(a.weight for a in arms) <= 0:
        raise Invalid("arm weights must be >= 0 with a positive sum")
    if unit not in ("conversation", "business"):
        raise Invalid("unit must be 'conversation' or 'business'")
    _validate_exploration(exploration)
    if business_id is not None and tenants.get_business(session, business_id=business_id) is None:
        raise NotFound(f"business {business_id} not found")
    scope = business_id or GLOBAL_SCOPE
    running = repository.running_for_scope(session, scope=scope)
    if running is not None:
        raise Conflict(
            f"experiment {running.id} ({running.name!r}) is already running for scope "
            f"{scope!r}; stop it first"
        )
    base_models = set()
    for spec in arms:
        policy = policies.get_policy(session, policy_id=spec.policy_id)
        if policy.status not in (PolicyStatus.APPROVED, PolicyStatus.SERVING):
            raise Conflict(
                f"policy {policy.id} is {policy.status}; only approved policies can serve"
            )
        base_models.add(policy.base_model)
    if len(base_models) > 1:
        raise Invalid(f"all arms must share one base model, got {sorted(base_models)}")
    experiment = Experiment(
        name=name, scope=scope, unit=unit, salt=secrets.token_hex(8), exploration=exploration
    )
    repository.add(session, experiment)
    for position, spec in enumerate(arms):
        repository.add(
            session,
            Arm(
                experiment_id=experiment.id,
                name=spec.name,
                position=position,
                policy_id=spec.policy_id,
                weight=spec.weight,
            ),
        )
        policies.transition(session, policy_id=spec.policy_id, to=PolicyStatus.SERVING)
    session.refresh(experiment)
    audit.record(
        session,
        actor=actor,
        action="experiment.created",
        subject_type="experiment",
        subject_id=experiment.id,
        data={
            "name": name,
            "scope": scope,
            "arms": [{"name": a.name, "policy_id": a.policy_id, "weight": a.weight} for a in arms],
        },
    )
    return experiment


def get_experiment(session: Session, *, experiment_id: str) -> Experiment:
    experiment = repository.get_experiment(session, experiment_id=experiment_id)
    if experiment is None:
        raise NotFound(f"experiment {experiment_id} not found")
    return experiment


def set_weights(
    session: Session,
    *,
    experiment_id: str,
    weights: dict[str, float],
    actor: str = audit.SYSTEM_ACTOR,
) -> Experiment:
    """Change arm weights; units already assigned keep their arm."""
    experiment = get_experiment(session, experiment_id=experiment_id)
    if experiment.status != "running":
        raise Conflict(f"experiment {experiment_id} is stopped")
    by_name = {arm.name: arm for arm in experiment.arms}
    unknown = set(weights) - set(by_name)
    if unknown:
        raise Invalid(f"unknown arm(s) {sorted(unknown)}; arms are {sorted(by_name)}")
    merged = {name: weights.get(name, arm.weight) for name, arm in by_name.items()}
    if any(w < 0 for w in merged.values()) or sum(merged.values()) <= 0:
        raise Invalid("arm weights must be >= 0 with a positive sum")
    before = {name: arm.weight for name, arm in by_name.items()}
    for name, weight in merged.items():
        by_name[name].weight = weight
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="experiment.weights_changed",
        subject_type="experiment",
        subject_id=experiment.id,
        data={"before": before, "after": merged},
    )
    return experiment


def stop_experiment(
    session: Session,
    *,
    experiment_id: str,
    actor: str = audit.SYSTEM_ACTOR,
    action: str = "experiment.stopped",
    data: dict[str, Any] | None = None,
) -> Experiment:
    """Stop an experiment (its conversations keep their arm until they end); `action` and
    `data` name the decision in the audit trail (a promotion, a rollback)."""
    experiment = get_experiment(session, experiment_id=experiment_id)
    if experiment.status == "stopped":
        return experiment
    audit.record(
        session,
        actor=actor,
        action=action,
        subject_type="experiment",
        subject_id=experiment.id,
        data=data,
    )
    experiment.status = "stopped"
    experiment.stopped_at = utcnow()
    session.flush()
    still_serving = repository.policies_in_running_experiments(session)
    for arm in experiment.arms:
        if arm.policy_id not in still_serving:
            policies.transition(session, policy_id=arm.policy_id, to=PolicyStatus.APPROVED)
    return experiment


def _assign(session: Session, experiment: Experiment, unit_id: str) -> Assignment:
    existing = repository.get_assignment(session, experiment_id=experiment.id, unit_id=unit_id)
    if existing is not None:
        return existing
    weights = [arm.weight for arm in experiment.arms]
    index = choose_index(weights, unit_interval(experiment.salt, unit_id))
    assignment = Assignment(
        experiment_id=experiment.id,
        unit_id=unit_id,
        arm_id=experiment.arms[index].id,
        probability=weights[index] / sum(weights),
    )
    try:
        with session.begin_nested():
            repository.add(session, assignment)
    except IntegrityError:  # another request assigned the same unit a moment ago
        existing = repository.get_assignment(session, experiment_id=experiment.id, unit_id=unit_id)
        assert existing is not None
        return existing
    return assignment


def serve_conversation(session: Session, *, conversation: Conversation) -> Served:
    """The conversation's arm: fixed at its first suggestion and kept for its life."""
    if conversation.arm_id is not None:
        arm = repository.get_arm(session, arm_id=conversation.arm_id)
        assert arm is not None
        experiment = get_experiment(session, experiment_id=arm.experiment_id)
        probability = 1.0
        assignment = repository.get_assignment(
            session, experiment_id=experiment.id, unit_id=_unit_id(experiment, conversation)
        )
        if assignment is not None:
            probability = assignment.probability
        return Served(
            experiment, arm, policies.get_policy(session, policy_id=arm.policy_id), probability
        )
    running = repository.running_for_scope(
        session, scope=conversation.business_id
    ) or repository.running_for_scope(session, scope=GLOBAL_SCOPE)
    if running is None:
        raise Conflict(
            f"no running experiment serves business {conversation.business_id}; create one "
            "(POST /v1/experiments or `outcomeloop experiments create`)"
        )
    assignment = _assign(session, running, _unit_id(running, conversation))
    arm = repository.get_arm(session, arm_id=assignment.arm_id)
    assert arm is not None
    conversation.arm_id = arm.id
    session.flush()
    return Served(
        running,
        arm,
        policies.get_policy(session, policy_id=arm.policy_id),
        assignment.probability,
    )


def _unit_id(experiment: Experiment, conversation: Conversation) -> str:
    return conversation.id if experiment.unit == "conversation" else conversation.business_id


def arm_labels(session: Session, *, arm_id: str | None) -> tuple[str, str]:
    """(experiment id, arm name) for metric labels; ("none", "none") without an arm."""
    if arm_id is None:
        return "none", "none"
    arm = repository.get_arm(session, arm_id=arm_id)
    return ("none", "none") if arm is None else (arm.experiment_id, arm.name)
