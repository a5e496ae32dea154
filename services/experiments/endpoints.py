"""Operator endpoints for A/B experiments."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.deps import OperatorDep, SessionDep
from services.experiments import decisions, report, repository, schemas, service
from services.pages import AfterQuery, LimitQuery, Page, unknown_cursor

router = APIRouter(prefix="/v1/experiments", tags=["operator"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.ExperimentOut)
def create_experiment(
    body: schemas.ExperimentCreate, session: SessionDep, operator: OperatorDep
) -> schemas.ExperimentOut:
    experiment = service.create_experiment(
        session,
        name=body.name,
        business_id=body.business_id,
        unit=body.unit,
        arms=[service.ArmSpec(a.name, a.policy_id, a.weight) for a in body.arms],
        exploration=body.exploration.model_dump() if body.exploration else None,
        actor=operator.key_id,
    )
    session.commit()
    return schemas.ExperimentOut.model_validate(experiment)


@router.get("", response_model=Page[schemas.ExperimentOut])
def list_experiments(
    session: SessionDep, _: OperatorDep, after: AfterQuery = None, limit: LimitQuery = 100
) -> Page[schemas.ExperimentOut]:
    """Experiments, newest first."""
    try:
        rows, has_more = repository.page_experiments(session, after=after, limit=limit)
    except LookupError:
        raise unknown_cursor("experiment", str(after)) from None
    return Page(data=[schemas.ExperimentOut.model_validate(e) for e in rows], has_more=has_more)


@router.get("/{experiment_id}", response_model=schemas.ExperimentOut)
def get_experiment(
    experiment_id: str, session: SessionDep, _: OperatorDep
) -> schemas.ExperimentOut:
    experiment = service.get_experiment(session, experiment_id=experiment_id)
    return schemas.ExperimentOut.model_validate(experiment)


@router.post("/{experiment_id}/weights", response_model=schemas.ExperimentOut)
def set_weights(
    experiment_id: str, body: schemas.WeightsUpdate, session: SessionDep, operator: OperatorDep
) -> schemas.ExperimentOut:
    experiment = service.set_weights(
        session, experiment_id=experiment_id, weights=body.weights, actor=operator.key_id
    )
    session.commit()
    return schemas.ExperimentOut.model_validate(experiment)


@router.post("/{experiment_id}/stop", response_model=schemas.ExperimentOut)
def stop_experiment(
    experiment_id: str, session: SessionDep, operator: OperatorDep
) -> schemas.ExperimentOut:
    experiment = service.stop_experiment(
        session, experiment_id=experiment_id, actor=operator.key_id
    )
    session.commit()
    return schemas.ExperimentOut.model_validate(experiment)


@router.get("/{experiment_id}/results", response_model=schemas.ExperimentResultsOut)
def experiment_results(
    experiment_id: str, session: SessionDep, _: OperatorDep
) -> schemas.ExperimentResultsOut:
    """Per-arm outcome rates and each arm against control (see `methods`)."""
    return schemas.ExperimentResultsOut.of(
        report.full_results(session, experiment_id=experiment_id)
    )


@router.post("/{experiment_id}/promote", response_model=schemas.ExperimentOut)
def promote(
    experiment_id: str, body: schemas.PromoteRequest, session: SessionDep, operator: OperatorDep
) -> schemas.ExperimentOut:
    """The arm's policy serves every new conversation of the scope: this experiment stops and
    the one-arm experiment returned serves it. Conversations already assigned keep their arm
    until they end. 409 while the sample-ratio check fires."""
    experiment = decisions.promote(
        session, experiment_id=experiment_id, arm=body.arm, actor=operator.key_id
    )
    session.commit()
    return schemas.ExperimentOut.model_validate(experiment)
