from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.experiments.report import METHODS, ExperimentResults


class ArmIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    policy_id: str = Field(min_length=1, max_length=64)
    weight: float = Field(ge=0)


class PersonaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    instruction: str = Field(min_length=1, max_length=500)


class ExplorationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(ge=0, le=1, description="Probability of drawing a persona.")
    personas: list[PersonaIn] | None = Field(
        default=None, description="Default: tone, length and emoji personas."
    )


class ExperimentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    business_id: str | None = Field(default=None, description="Scope; null = all businesses.")
    unit: Literal["conversation", "business"] = "conversation"
    arms: list[ArmIn] = Field(min_length=1)
    exploration: ExplorationIn | None = None


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arm: str = Field(min_length=1, max_length=64, description="The arm whose policy wins.")


class WeightsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] = Field(description="Arm name -> new weight.")


class ArmOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    policy_id: str
    weight: float


class ExperimentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    scope: str
    unit: str
    status: str
    exploration: dict[str, Any] | None
    arms: list[ArmOut]
    created_at: datetime
    stopped_at: datetime | None


RELATIONS = ("accepted", "edited", "rejected", "abstained")


class TestOut(BaseModel):
    method: str
    p_value: float


class ArmResultOut(BaseModel):
    name: str
    policy_id: str
    weight: float
    units: int = Field(description="Units (conversations or businesses) assigned to the arm.")
    conversations: int
    ended: int = Field(description="Conversations ended: the outcome rate's denominator.")
    outcomes: int
    outcome_rate: float
    outcome_rate_interval: tuple[float, float]
    reply_rates: dict[str, float] = Field(
        description="Share of business replies that accepted, edited, rejected the suggestion "
        "or came after an abstention."
    )
    replies: int
    suggestions: int
    mean_latency_ms: float | None


class ComparisonOut(BaseModel):
    treatment: str
    control: str
    difference: float = Field(description="Outcome rate, treatment minus control.")
    difference_interval: tuple[float, float]
    test: TestOut
    sequential_interval: tuple[float, float] = Field(
        description="Always valid: may be looked at every day without inflating errors."
    )
    sequential_verdict: Literal["better", "worse", "inconclusive"]
    probability_treatment_better: float
    minimum_detectable_effect: float | None = Field(
        description="The smallest lift over control's rate detectable at the current sizes "
        "(null: none up to a rate of 1)."
    )


class SrmOut(BaseModel):
    method: str
    p_value: float
    flagged: bool


class ExperimentResultsOut(BaseModel):
    experiment_id: str
    name: str
    status: str
    unit: str
    control: str
    arms: list[ArmResultOut]
    comparisons: list[ComparisonOut]
    sample_ratio_mismatch: SrmOut
    methods: dict[str, str] = Field(description="The method behind each reported number.")

    @classmethod
    def of(cls, results: ExperimentResults) -> ExperimentResultsOut:
        return cls(
            experiment_id=results.experiment_id,
            name=results.name,
            status=results.status,
            unit=results.unit,
            control=results.control,
            arms=[
                ArmResultOut(
                    name=arm.arm,
                    policy_id=arm.policy,
                    weight=arm.weight,
                    units=arm.units,
                    conversations=arm.conversations,
                    ended=arm.ended,
                    outcomes=arm.outcomes,
                    outcome_rate=arm.outcome_rate,
                    outcome_rate_interval=arm.interval,
                    reply_rates={r: arm.relation_rate(r) for r in RELATIONS},
                    replies=sum(arm.relations.values()),
                    suggestions=arm.suggestions,
                    mean_latency_ms=arm.mean_latency_ms,
                )
                for arm in results.arms
            ],
            comparisons=[
                ComparisonOut(
                    treatment=c.treatment,
                    control=c.control,
                    difference=c.difference,
                    difference_interval=c.interval,
                    test=TestOut(method=c.test.method, p_value=c.test.p_value),
                    sequential_interval=c.sequential_interval,
                    sequential_verdict=c.sequential_verdict,
                    probability_treatment_better=c.probability_better,
                    minimum_detectable_effect=c.minimum_detectable_effect,
                )
                for c in results.comparisons
            ],
            sample_ratio_mismatch=SrmOut(
                method=results.srm.method, p_value=results.srm.p_value, flagged=results.srm_flagged
            ),
            methods=METHODS,
        )
