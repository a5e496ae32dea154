"""The iteration state machine. Steps are idempotent by (iteration id, step): a redelivered
step that is done is skipped, one running under a live lease waits, one whose lease expired
(its worker died) is taken over. Services flush; the edge (request, task, CLI) commits."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from services.audit import service as audit
from services.db import utcnow
from services.errors import Conflict, Invalid, NotFound, Unavailable
from services.experiments import repository as experiments
from services.experiments.models import GLOBAL_SCOPE
from services.iterations import repository
from services.iterations.config_models import build_config
from services.iterations.models import (
    PIPELINE,
    Iteration,
    IterationEvent,
    IterationStatus,
    IterationStep,
    Step,
)
from services.iterations.pipeline_config import PipelineConfig
from services.iterations.runner import StepRunner
from services.iterations.schemas import IterationRequest
from services.policies import service as policies
from services.policies.models import PolicyStatus
from services.settings import Settings
from workers.learning.config_build import IMPROVEMENT_CONFIGS, OFFLINE_ALGORITHMS
from workers.learning.configs import QFitConfig
from workers.learning.returns import ReturnsConfig

log = logging.getLogger(__name__)

TERMINAL = {IterationStatus.SUCCEEDED, IterationStatus.FAILED, IterationStatus.CANCELLED}


def served_sampling(settings: Settings, hyperparameters: Mapping[str, Any]) -> dict[str, float]:
    """The temperature and top_p the improvement must use: the ones the policy is served with.

    PPO, RLOO and GRPO sample the policy, score the samples and take the KL to pi_i at one
    temperature and top_p; a policy improved at other values is not the one that acts.
    """
    if settings.temperature <= 0:
        raise Conflict(
            "the policy is served greedily (OUTCOMELOOP_TEMPERATURE=0): PPO, RLOO and GRPO "
            "improve a sampling policy, at the temperature it is served with; serve with a "
            "positive temperature (e.g. 0.7) to run iterations"
        )
    served = {"temperature": settings.temperature, "top_p": settings.top_p}
    for name, value in served.items():
        given = hyperparameters.get(name)
        if given is not None and not math.isclose(given, value, rel_tol=1e-9, abs_tol=1e-12):
            raise Invalid(
                f"hyperparameters.{name}: {given} is not the served {name} {value} "
                f"(OUTCOMELOOP_{name.upper()}); the policy is improved at the sampling it is "
                f"served with: leave {name} out"
            )
    return served


def resolve_configs(
    request: IterationRequest, *, settings: Settings, base_model: str
) -> dict[str, Any]:
    """The config dataclass of every step, from a validated request and what is served."""
    hyper = request.hyperparameter_values()
    data = request.data_values()
    q_values = hyper.pop("q", {})
    offline = request.algorithm in OFFLINE_ALGORITHMS  # samples nothing: no served sampling
    sampling = {} if offline else served_sampling(settings, hyper)
    try:
        returns = build_config(ReturnsConfig, request.returns_values())
        q = build_config(QFitConfig, q_values, base_model=base_model)
        # DMPO weighs turns with the discount of the MDP, the returns' gamma.
        discount = {"gamma": returns.gamma} if request.algorithm == "dmpo" else {}
        hyper.pop("gamma", None)
        improve = build_config(
            IMPROVEMENT_CONFIGS[request.algorithm], hyper, **sampling, **discount
        )
        pipeline = build_config(PipelineConfig, data)
    except ValueError as exc:  # e.g. a value valid alone that the served sampling rules out
        raise Invalid(f"invalid iteration config: {exc}") from None
    return {
        "returns": asdict(returns),
        "q": asdict(q),
        "improve": {"algorithm": request.algorithm, **asdict(improve)},
        "pipeline": asdict(pipeline),
    }


def current_policy(session: Session, *, business_id: str | None) -> str:
    """pi_i, the policy an automatic iteration improves: the newest of the lineage serving the
    scope.

    The rule: take the running experiment of the scope (a business's own, else the global one)
    and its arms with a positive weight; drop every arm policy that is an ancestor of another
    arm's policy (after approval the A/B runs pi_i as control and pi_{i+1} as treatment, so
    pi_{i+1} is current, whatever the weights); of what remains, the largest weight, then the
    most recently created. An operator who sets the treatment's weight to 0 makes the control
    current again.
    """
    experiment = None
    if business_id is not None:
        experiment = experiments.running_for_scope(session, scope=business_id)
    experiment = experiment or experiments.running_for_scope(session, scope=GLOBAL_SCOPE)
    if experiment is None or not experiment.arms:
        raise Conflict("no running experiment: name the policy to improve (parent_policy_id)")
    live = [arm for arm in experiment.arms if arm.weight > 0]
    if not live:
        raise Conflict(f"experiment {experiment.id} has no arm with a positive weight")
    candidates = {
        arm.policy_id: policies.get_policy(session, policy_id=arm.policy_id) for arm in live
    }
    ancestors = {
        ancestor.id
        for policy_id in candidates
        for ancestor in policies.lineage(session, policy_id=policy_id)[1:]
    }
    newest = [arm for arm in live if arm.policy_id not in ancestors] or live
    best = max(
        newest, key=lambda arm: (arm.weight, candidates[arm.policy_id].created_at, arm.position)
    )
    return best.policy_id


def create_iteration(
    session: Session,
    *,
    settings: Settings,
    request: IterationRequest,
    trigger: str = "operator",
) -> Iteration:
    """A queued iteration; the request was validated by its model (schemas.IterationCreate)."""
    data = request.data_values()
    business_id = data.get("business_id")
    parent_id = request.parent_policy_id or current_policy(session, business_id=business_id)
    parent = policies.get_policy(session, policy_id=parent_id)
    configs = resolve_configs(request, settings=settings, base_model=parent.base_model)
    given = request.model_dump(mode="json", exclude_unset=True, by_alias=True)
    iteration = Iteration(
        algorithm=request.algorithm,
        hyperparameters=given.get("hyperparameters", {}),
        data=given.get("data", {}),
        configs=configs,
        parent_policy_id=parent.id,
        business_id=business_id,
        override_gate=configs["pipeline"]["override_gate"],
        trigger=trigger,
        data_cutoff=utcnow(),
        current_step=PIPELINE[0].value,
    )
    repository.add(session, iteration)
    add_event(
        session, iteration, "created", f"{request.algorithm} iteration of {parent.id} ({trigger})"
    )
    return iteration


def get_iteration(session: Session, *, iteration_id: str) -> Iteration:
    iteration = repository.get_iteration(session, iteration_id=iteration_id)
    if iteration is None:
        raise NotFound(f"iteration {iteration_id} not found")
    return iteration


def _locked(session: Session, iteration_id: str) -> Iteration:
    iteration = repository.lock_iteration(session, iteration_id=iteration_id)
    if iteration is None:
        raise NotFound(f"iteration {iteration_id} not found")
    return iteration


def add_event(
    session: Session,
    iteration: Iteration,
    kind: str,
    message: str,
    data: dict[str, Any] | None = None,
) -> None:
    repository.add(
        session,
        IterationEvent(
            iteration_id=iteration.id,
            seq=repository.next_event_seq(session, iteration_id=iteration.id),
            kind=kind,
            message=message,
            data=data,
        ),
    )


@dataclass(frozen=True)
class StepStart:
    """What a delivered step should do: run it, skip it (done, or the iteration moved on), or
    wait (another worker holds a live lease)."""

    action: str  # "run" | "skip" | "wait"
    attempt: int = 0
    reason: str = ""


def begin_step(
    session: Session, *, iteration_id: str, step: Step, worker: str, lease_s: float
) -> StepStart:
    iteration = _locked(session, iteration_id)
    status = IterationStatus(iteration.status)
    if status in TERMINAL or status is IterationStatus.AWAITING_APPROVAL:
        return StepStart("skip", reason=f"iteration is {status.value}")
    if iteration.current_step != step.value:
        return StepStart("skip", reason=f"iteration is at step {iteration.current_step}")
    row = repository.get_step(session, iteration_id=iteration.id, step=step.value)
    now = utcnow()
    if row is not None and row.status == "done":
        return StepStart("skip", reason="already done")
    if row is not None and row.status == "running" and row.lease_expires_at is not None:
        if row.lease_expires_at > now:
            return StepStart("wait", attempt=row.attempts, reason=f"held by {row.worker}")
        add_event(session, iteration, "takeover", f"{step.value}: lease of {row.worker} expired")
    if row is None:
        row = IterationStep(iteration_id=iteration.id, step=step.value, attempts=0)
        repository.add(session, row)
    row.status = "running"
    row.attempts += 1
    row.worker = worker
    row.error = None
    row.started_at = now
    row.lease_expires_at = now + timedelta(seconds=lease_s)
    iteration.status = IterationStatus.RUNNING.value
    iteration.updated_at = now
    add_event(session, iteration, "step_started", f"{step.value} (attempt {row.attempts})")
    session.flush()
    return StepStart("run", attempt=row.attempts)


def finish_step(
    session: Session,
    *,
    iteration_id: str,
    step: Step,
    result: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> Step | None:
    """Record a finished step and advance; returns the next step to enqueue, if any."""
    iteration = _locked(session, iteration_id)
    row = repository.get_step(session, iteration_id=iteration.id, step=step.value)
    if row is None or row.status == "done" or iteration.current_step != step.value:
        return None  # a duplicate finished first; nothing to advance
    now = utcnow()
    row.status = "done"
    row.result = result
    row.finished_at = now
    row.lease_expires_at = None
    if metrics:
        iteration.metrics = {**iteration.metrics, **metrics}
    add_event(session, iteration, "step_done", step.value, data=_brief(result))
    iteration.updated_at = now
    next_step: Step | None = None
    if step is Step.DEPLOY:
        iteration.status = IterationStatus.SUCCEEDED.value
        iteration.current_step = None
        iteration.progress = 1.0
        iteration.finished_at = now
    elif step is Step.REGISTER:
        iteration.status = IterationStatus.AWAITING_APPROVAL.value
        iteration.current_step = Step.DEPLOY.value
        iteration.progress = len(PIPELINE) / (len(PIPELINE) + 1)
        add_event(
            session,
            iteration,
            "awaiting_approval",
            f"candidate {iteration.candidate_policy_id}; {check_summary(iteration.metrics)}",
            data={
                k: v for k, v in iteration.metrics.items() if k.startswith(("check_", "estimate_"))
            },
        )
    else:
        next_step = PIPELINE[PIPELINE.index(step) + 1]
        iteration.current_step = next_step.value
        iteration.progress = (PIPELINE.index(step) + 1) / (len(PIPELINE) + 1)
    session.flush()
    return next_step


def check_summary(metrics: dict[str, Any]) -> str:
    """One line for the operator at approval: the candidate check's gain and estimates."""
    if "check_flagged" not in metrics:
        return "no candidate check (skipped: too little held-out data, or check_samples 0)"

    def interval(name: str) -> str:
        value, lo, hi = (metrics.get(k) for k in (name, f"{name}_lo", f"{name}_hi"))
        if value is None:
            return "n/a"
        bounds = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
        return f"{value:+.3f}{bounds}"

    flag = "FLAGGED: lower bound not above 0" if metrics["check_flagged"] else "lower bound above 0"
    return (
        f"held-out Q gain pi_i+1 - pi_i {interval('check_gain')} ({flag}); estimated outcome "
        f"rate: direct {interval('estimate_direct')}, doubly robust {interval('estimate_dr')} "
        f"(ESS {metrics.get('estimate_ess')}), pi_i direct {interval('estimate_direct_parent')}"
    )


def abandon_step(session: Session, *, iteration_id: str, step: Step) -> None:
    """Close the step row of a cancelled iteration (which stays cancelled)."""
    iteration = _locked(session, iteration_id)
    row = repository.get_step(session, iteration_id=iteration.id, step=step.value)
    if row is not None and row.status == "running":
        row.status = "failed"
        row.error = "cancelled by an operator"
        row.finished_at = utcnow()
        row.lease_expires_at = None
    add_event(
        session, iteration, "step_stopped", f"{step.value} stopped: the iteration is cancelled"
    )
    session.flush()


def fail_step(session: Session, *, iteration_id: str, step: Step, error: str) -> None:
    iteration = _locked(session, iteration_id)
    row = repository.get_step(session, iteration_id=iteration.id, step=step.value)
    now = utcnow()
    if row is not None:
        row.status = "failed"
        row.error = error[:4000]
        row.finished_at = now
        row.lease_expires_at = None
    iteration.status = IterationStatus.FAILED.value
    iteration.error = f"{step.value}: {error}"[:4000]
    iteration.finished_at = now
    iteration.updated_at = now
    add_event(session, iteration, "failed", iteration.error)
    session.flush()


def dispatch(session: Session, runner: StepRunner, *, iteration_id: str, step: Step) -> None:
    """Queue `step`, after the transaction that made it due has committed. If the queue refuses
    (the broker is down), the iteration is failed at that step, so that it neither sits queued
    forever nor blocks automatic iterations, and `retry` resumes it; Unavailable (503) says so."""
    try:
        runner.submit(iteration_id, step)
    except Exception as exc:
        log.error("iteration %s: could not queue %s: %r", iteration_id, step.value, exc)
        session.rollback()
        iteration = _locked(session, iteration_id)
        iteration.current_step = step.value  # where retry resumes
        fail_step(
            session,
            iteration_id=iteration_id,
            step=step,
            error=f"could not queue the step ({type(exc).__name__}); retry when the queue is up",
        )
        session.commit()
        raise Unavailable(
            f"the step queue is unreachable: iteration {iteration_id} is failed at "
            f"{step.value}; retry it (POST /v1/iterations/{iteration_id}/retry) when the queue "
            "is back"
        ) from None


def stalled_iterations(session: Session, *, older_than_s: float) -> list[tuple[str, Step]]:
    """Queued iterations untouched for `older_than_s` (longer than the broker keeps an
    unacknowledged step): their step message was lost between commit and queue (a crash), so
    it is sent again; steps are idempotent, a duplicate does no harm."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return [
        (it.id, Step(it.current_step or PIPELINE[0].value))
        for it in repository.queued_before(session, cutoff=cutoff)
    ]


class IterationCancelled(Exception):
    """Raised at a running step's next progress report after an operator cancelled it."""


def set_progress(session: Session, *, iteration_id: str, step: Step, fraction: float) -> None:
    """Record a running step's progress; IterationCancelled when the iteration was cancelled
    meanwhile, which stops the step where it reports (PPO reports after every update)."""
    iteration = _locked(session, iteration_id)
    if iteration.status == IterationStatus.CANCELLED.value:
        raise IterationCancelled(f"iteration {iteration_id} was cancelled during {step.value}")
    if iteration.current_step != step.value:
        return
    base = PIPELINE.index(step) if step in PIPELINE else len(PIPELINE)
    iteration.progress = (base + max(0.0, min(1.0, fraction))) / (len(PIPELINE) + 1)
    iteration.updated_at = utcnow()
    session.flush()


def set_candidate(session: Session, *, iteration_id: str, policy_id: str) -> None:
    iteration = _locked(session, iteration_id)
    iteration.candidate_policy_id = policy_id
    session.flush()


def approve(session: Session, *, iteration_id: str, actor: str = audit.SYSTEM_ACTOR) -> Iteration:
    """An operator approves the candidate: the deploy step starts the A/B experiment."""
    iteration = _locked(session, iteration_id)
    if iteration.status != IterationStatus.AWAITING_APPROVAL.value:
        raise Conflict(f"iteration {iteration.id} is {iteration.status}, not awaiting_approval")
    iteration.status = IterationStatus.QUEUED.value
    iteration.updated_at = utcnow()
    add_event(session, iteration, "approved", f"candidate {iteration.candidate_policy_id}")
    _audit(session, iteration, actor, "iteration.approved")
    session.flush()
    return iteration


def reject(session: Session, *, iteration_id: str, actor: str = audit.SYSTEM_ACTOR) -> Iteration:
    iteration = _locked(session, iteration_id)
    if iteration.status != IterationStatus.AWAITING_APPROVAL.value:
        raise Conflict(f"iteration {iteration.id} is {iteration.status}, not awaiting_approval")
    if iteration.candidate_policy_id:
        policies.transition(
            session, policy_id=iteration.candidate_policy_id, to=PolicyStatus.REJECTED
        )
    iteration.status = IterationStatus.CANCELLED.value
    iteration.finished_at = utcnow()
    add_event(session, iteration, "rejected", f"candidate {iteration.candidate_policy_id}")
    _audit(session, iteration, actor, "iteration.rejected")
    session.flush()
    return iteration


def cancel(session: Session, *, iteration_id: str, actor: str = audit.SYSTEM_ACTOR) -> Iteration:
    iteration = _locked(session, iteration_id)
    if IterationStatus(iteration.status) in TERMINAL:
        raise Conflict(f"iteration {iteration.id} is already {iteration.status}")
    iteration.status = IterationStatus.CANCELLED.value
    iteration.finished_at = utcnow()
    add_event(session, iteration, "cancelled", "cancelled by an operator")
    _audit(session, iteration, actor, "iteration.cancelled")
    session.flush()
    return iteration


def _audit(session: Session, iteration: Iteration, actor: str, action: str) -> None:
    audit.record(
        session,
        actor=actor,
        action=action,
        subject_type="iteration",
        subject_id=iteration.id,
        data={"candidate_policy_id": iteration.candidate_policy_id},
    )


def retry(session: Session, *, iteration_id: str, override_gate: bool) -> Step:
    """Resume a failed iteration from its failed step (done steps are not redone)."""
    iteration = _locked(session, iteration_id)
    if iteration.status != IterationStatus.FAILED.value:
        raise Conflict(f"iteration {iteration.id} is {iteration.status}; only failed ones retry")
    iteration.status = IterationStatus.QUEUED.value
    iteration.error = None
    iteration.finished_at = None
    iteration.override_gate = iteration.override_gate or override_gate
    add_event(
        session,
        iteration,
        "retry",
        f"resume at {iteration.current_step}" + (" (Q gate overridden)" if override_gate else ""),
    )
    session.flush()
    return Step(iteration.current_step or PIPELINE[0].value)


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """The scalar part of a step result, for the event log."""
    return {k: v for k, v in result.items() if isinstance(v, int | float | str | bool)}
