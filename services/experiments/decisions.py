"""Decisions on an experiment from its evidence: promoting an arm, and the guardrail that rolls
a harmful treatment back to control by itself."""

from __future__ import annotations

from sqlalchemy.orm import Session

from services.errors import Conflict, Invalid
from services.experiments import report, repository
from services.experiments.models import GLOBAL_SCOPE, Experiment
from services.experiments.service import ArmSpec, create_experiment, get_experiment, stop_experiment
from services.experiments.statistics import sequential_interval_means

GUARDRAIL_ACTOR = "guardrail"
GUARDRAIL_TASK = "outcomeloop.experiments.check_guardrails"  # Celery beat (workers/tasks.py)


def promote(
    session: Session,
    *,
    experiment_id: str,
    arm: str,
    actor: str,
    action: str = "experiment.promoted",
    evidence: dict[str, object] | None = None,
) -> Experiment:
    """The arm's policy serves the experiment's whole scope from now on: the experiment stops
    and a one-arm experiment serves that policy to every new conversation. A conversation
    already assigned keeps its arm until it ends (a conversation never changes policy mid-way:
    its return is data of the policy that served it). Refused while the sample-ratio check
    fires: the evidence is broken. Returns the new experiment."""
    experiment = get_experiment(session, experiment_id=experiment_id)
    if experiment.status != "running":
        raise Conflict(f"experiment {experiment_id} is {experiment.status}; nothing to promote")
    winner = next((a for a in experiment.arms if a.name == arm), None)
    if winner is None:
        names = [a.name for a in experiment.arms]
        raise Invalid(f"experiment {experiment_id} has no arm {arm!r}; arms are {names}")
    results = report.full_results(session, experiment_id=experiment_id)
    if results.srm_flagged and action == "experiment.promoted":
        raise Conflict(
            f"sample ratio mismatch (p = {results.srm.p_value:.2g}): the arms' sizes do not "
            "follow their weights, so assignment or logging is broken; promotion is blocked "
            "until that is fixed"
        )
    stop_experiment(
        session,
        experiment_id=experiment_id,
        actor=actor,
        action=action,
        data={"arm": winner.name, "policy_id": winner.policy_id, **(evidence or {})},
    )
    return create_experiment(
        session,
        name=f"{experiment.name}: {winner.name} serves"[:200],
        arms=[ArmSpec(winner.name, winner.policy_id, 1.0)],
        business_id=None if experiment.scope == GLOBAL_SCOPE else experiment.scope,
        unit=experiment.unit,
        exploration=experiment.exploration,
        actor=actor,
    )


def check_guardrails(session: Session, *, experiment_id: str) -> Experiment | None:
    """Roll the experiment back to control when an arm's outcome rate, or its conversations'
    share of accepted suggestions, is significantly below control's by the always-valid
    interval (so checking on every beat keeps its error rate). Returns the experiment now
    serving control, or None when nothing fired."""
    experiment = get_experiment(session, experiment_id=experiment_id)
    if experiment.status != "running" or len(experiment.arms) < 2:
        return None
    results = report.full_results(session, experiment_id=experiment_id)
    worse: list[dict[str, object]] = [
        {
            "arm": c.treatment,
            "metric": "outcome_rate",
            "difference": c.difference,
            "sequential_interval": list(c.sequential_interval),
        }
        for c in results.comparisons
        if c.sequential_verdict == "worse"
    ]
    worse += _worse_acceptance(session, experiment_id, results.control)
    if not worse:
        return None
    evidence: dict[str, object] = {
        "reason": "significantly below control (always-valid 95% interval)",
        "worse": worse,
    }
    return promote(
        session,
        experiment_id=experiment_id,
        arm=results.control,
        actor=GUARDRAIL_ACTOR,
        action="experiment.rolled_back",
        evidence=evidence,
    )


def _worse_acceptance(
    session: Session, experiment_id: str, control: str
) -> list[dict[str, object]]:
    """Arms whose conversations accept suggestions significantly less than control's: each
    conversation's share of accepted replies is the unit, compared by the always-valid interval
    of a difference of means."""
    shares = {
        arm: [yes / total for yes, total in rows]
        for arm, rows in repository.conversation_acceptance(
            session, experiment_id=experiment_id
        ).items()
    }
    if control not in shares:
        return []

    def moments(values: list[float]) -> tuple[float, float, int]:
        mean = sum(values) / len(values)
        return mean, sum((v - mean) ** 2 for v in values) / len(values), len(values)

    mean_c, var_c, n_c = moments(shares[control])
    worse: list[dict[str, object]] = []
    for arm, values in shares.items():
        if arm == control:
            continue
        mean_t, var_t, n_t = moments(values)
        low, high = sequential_interval_means(mean_t, var_t, n_t, mean_c, var_c, n_c)
        if high < 0:
            worse.append(
                {
                    "arm": arm,
                    "metric": "acceptance_rate",
                    "difference": mean_t - mean_c,
                    "sequential_interval": [low, high],
                }
            )
    return worse


def check_all_guardrails(session: Session) -> list[str]:
    """Every running experiment's guardrail; the ids of those rolled back."""
    rolled = []
    for experiment in repository.list_experiments(session, status="running"):
        if check_guardrails(session, experiment_id=experiment.id) is not None:
            rolled.append(experiment.id)
    return rolled
