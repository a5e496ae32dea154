"""Results of an experiment from the store: per arm, outcome rates with intervals, how replies
used suggestions and their latency; each arm against control by the methods of statistics.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from services.audit import repository as audit
from services.experiments import repository
from services.experiments.models import Experiment
from services.experiments.service import get_experiment
from services.experiments.statistics import (
    EXACT_BELOW,
    SEQUENTIAL_TUNING_N,
    SRM_ALPHA,
    TestResult,
    difference_interval,
    difference_test,
    minimum_detectable_effect,
    probability_better,
    sample_ratio_mismatch_expected,
    sequential_interval,
    wilson_interval,
)


@dataclass
class ArmResult:
    arm: str
    policy: str
    conversations: int
    ended: int
    outcomes: int
    relations: dict[str, int] = field(default_factory=dict)
    units: int = 0
    weight: float = 0.0
    suggestions: int = 0
    mean_latency_ms: float | None = None

    @property
    def outcome_rate(self) -> float:
        return self.outcomes / self.ended if self.ended else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.outcomes, self.ended)

    def relation_rate(self, relation: str) -> float:
        total = sum(self.relations.values())
        return self.relations.get(relation, 0) / total if total else 0.0


@dataclass(frozen=True)
class Comparison:
    """One arm against control, on the outcome rate of ended conversations."""

    treatment: str
    control: str
    difference: float  # rate(treatment) - rate(control)
    interval: tuple[float, float]
    test: TestResult
    sequential_interval: tuple[float, float]
    probability_better: float
    minimum_detectable_effect: float | None

    @property
    def sequential_verdict(self) -> str:
        """'better' / 'worse' when the always-valid interval excludes no difference."""
        low, high = self.sequential_interval
        return "better" if low > 0 else "worse" if high < 0 else "inconclusive"


@dataclass(frozen=True)
class ExperimentResults:
    experiment_id: str
    name: str
    status: str
    unit: str
    control: str
    arms: list[ArmResult]
    comparisons: list[Comparison]
    srm: TestResult

    @property
    def srm_flagged(self) -> bool:
        return self.srm.p_value < SRM_ALPHA


METHODS = {
    "outcome_rate_interval": "Wilson score interval, 95%",
    "difference_interval": "Newcombe hybrid score interval, 95%",
    "sequential_interval": "asymptotic confidence sequence (Waudby-Smith et al. 2023), 95%, "
    f"tightest at {SEQUENTIAL_TUNING_N} conversations",
    "probability_better": "P(rate_t > rate_c), independent Beta(1, 1) priors, exact",
    "minimum_detectable_effect": "two-sided z-test, alpha 5%, power 80%, at the current sizes",
    "srm": "chi-square goodness of fit of assigned units to the weights in force when each "
    f"was assigned (from the audit trail), flagged below p = {SRM_ALPHA}",
    "test": f"Boschloo exact test below {EXACT_BELOW} ended conversations in an arm, "
    "two-proportion score test above",
}


def experiment_results(session: Session, *, experiment_id: str) -> list[ArmResult]:
    """Per arm: units assigned, outcome rates over ended conversations, how replies used
    suggestions, suggestions and their latency."""
    experiment = get_experiment(session, experiment_id=experiment_id)
    weights = {arm.name: arm.weight for arm in experiment.arms}
    units = repository.arm_units(session, experiment_id=experiment_id)
    suggestions = repository.arm_suggestions(session, experiment_id=experiment_id)
    results = {
        str(row["arm"]): ArmResult(
            arm=str(row["arm"]),
            policy=str(row["policy"]),
            conversations=int(row["conversations"]),  # type: ignore[call-overload]
            ended=int(row["ended"]),  # type: ignore[call-overload]
            outcomes=int(row["outcomes"]),  # type: ignore[call-overload]
            units=units.get(str(row["arm"]), 0),
            weight=weights.get(str(row["arm"]), 0.0),
            suggestions=suggestions.get(str(row["arm"]), (0, None))[0],
            mean_latency_ms=suggestions.get(str(row["arm"]), (0, None))[1],
        )
        for row in repository.arm_outcomes(session, experiment_id=experiment_id)
    }
    for arm, relation, count in repository.arm_reply_relations(
        session, experiment_id=experiment_id
    ):
        results[arm].relations[relation] = count
    return list(results.values())


def compare(treatment: ArmResult, control: ArmResult) -> Comparison:
    """Treatment's outcome rate against control's, by every method the results report."""
    args = (treatment.outcomes, treatment.ended, control.outcomes, control.ended)
    return Comparison(
        treatment=treatment.arm,
        control=control.arm,
        difference=treatment.outcome_rate - control.outcome_rate,
        interval=difference_interval(*args) if treatment.ended and control.ended else (-1, 1),
        test=difference_test(*args),
        sequential_interval=sequential_interval(*args),
        probability_better=probability_better(*args),
        minimum_detectable_effect=minimum_detectable_effect(
            control.outcome_rate, control.ended, treatment.ended
        ),
    )


def control_arm(arms: list[ArmResult]) -> ArmResult:
    """The arm named 'control', else the first one."""
    return next((a for a in arms if a.arm == "control"), arms[0])


def weight_periods(
    session: Session, experiment: Experiment
) -> list[tuple[datetime | None, datetime | None, dict[str, float]]]:
    """The experiment's weights over time from its audit trail: (from, until, weights by arm),
    the first period open at its start, the last one open at its end. Without a trail (an
    experiment older than it), one period of the current weights."""
    current = {arm.name: arm.weight for arm in experiment.arms}
    events = audit.events_of(
        session,
        subject_id=experiment.id,
        actions=("experiment.created", "experiment.weights_changed"),
    )
    periods: list[tuple[datetime | None, datetime | None, dict[str, float]]] = []
    weights: dict[str, float] | None = None
    start: datetime | None = None
    for event in events:
        data = event.data or {}
        if event.action == "experiment.created":
            weights = {a["name"]: float(a["weight"]) for a in data.get("arms", [])}
            continue
        if weights is not None:
            periods.append((start, event.created_at, weights))
        weights, start = {k: float(v) for k, v in data.get("after", {}).items()}, event.created_at
    periods.append((start, None, weights if weights is not None else current))
    return periods


def sample_ratio_check(
    session: Session, experiment: Experiment, units: dict[str, int]
) -> TestResult:
    """The arms' units against what their weights, period by period, lead to expect."""
    names = [arm.name for arm in experiment.arms]
    expected = dict.fromkeys(names, 0.0)
    for start, end, weights in weight_periods(session, experiment):
        n = repository.units_assigned_between(
            session, experiment_id=experiment.id, start=start, end=end
        )
        total = sum(weights.get(name, 0.0) for name in names)
        if n and total > 0:
            for name in names:
                expected[name] += n * weights.get(name, 0.0) / total
    return sample_ratio_mismatch_expected(
        [units.get(name, 0) for name in names], [expected[name] for name in names]
    )


def full_results(session: Session, *, experiment_id: str) -> ExperimentResults:
    """Every arm's results, each other arm against control, and the sample-ratio check."""
    experiment = get_experiment(session, experiment_id=experiment_id)
    arms = experiment_results(session, experiment_id=experiment_id)
    control = control_arm(arms)
    srm = (
        sample_ratio_check(session, experiment, {a.arm: a.units for a in arms})
        if len(arms) > 1
        else TestResult("chi-square goodness of fit", 1.0)
    )
    return ExperimentResults(
        experiment_id=experiment.id,
        name=experiment.name,
        status=experiment.status,
        unit=experiment.unit,
        control=control.arm,
        arms=arms,
        comparisons=[compare(arm, control) for arm in arms if arm is not control],
        srm=srm,
    )
