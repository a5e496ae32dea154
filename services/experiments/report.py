"""Per-arm results of an experiment: outcome rates with intervals, suggestion acceptance."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from services.experiments import repository
from services.experiments.service import get_experiment
from services.experiments.statistics import wilson_interval


@dataclass
class ArmResult:
    arm: str
    policy: str
    conversations: int
    ended: int
    outcomes: int
    relations: dict[str, int] = field(default_factory=dict)

    @property
    def outcome_rate(self) -> float:
        return self.outcomes / self.ended if self.ended else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.outcomes, self.ended)

    def relation_rate(self, relation: str) -> float:
        total = sum(self.relations.values())
        return self.relations.get(relation, 0) / total if total else 0.0


def experiment_results(session: Session, *, experiment_id: str) -> list[ArmResult]:
    """Outcome rates over ended conversations of each arm, and how replies used suggestions."""
    get_experiment(session, experiment_id=experiment_id)
    results = {
        str(row["arm"]): ArmResult(
            arm=str(row["arm"]),
            policy=str(row["policy"]),
            conversations=int(row["conversations"]),  # type: ignore[call-overload]
            ended=int(row["ended"]),  # type: ignore[call-overload]
            outcomes=int(row["outcomes"]),  # type: ignore[call-overload]
        )
        for row in repository.arm_outcomes(session, experiment_id=experiment_id)
    }
    for arm, relation, count in repository.arm_reply_relations(
        session, experiment_id=experiment_id
    ):
        results[arm].relations[relation] = count
    return list(results.values())
