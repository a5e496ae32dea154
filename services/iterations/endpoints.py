"""Operator jobs API for policy iterations (shaped like a fine-tuning jobs API)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, status
from sqlalchemy.orm import Session, sessionmaker

from services.deps import OperatorDep, SessionDep, SettingsDep
from services.iterations import repository, schemas, service
from services.iterations.dispatch import enqueue
from services.iterations.models import Iteration, Step

router = APIRouter(prefix="/v1/iterations", tags=["operator"])


def get_session_factory(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    return factory


FactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]


def _out(session: Session, iteration: Iteration) -> schemas.IterationOut:
    session.refresh(iteration)
    return schemas.IterationOut.model_validate(iteration)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.IterationOut)
def create_iteration(
    body: schemas.IterationCreate,
    session: SessionDep,
    settings: SettingsDep,
    factory: FactoryDep,
    _: OperatorDep,
) -> schemas.IterationOut:
    iteration = service.create_iteration(
        session,
        algorithm=body.algorithm,
        hyperparameters=body.hyperparameters,
        data=body.data,
        parent_policy_id=body.parent_policy_id,
    )
    session.commit()
    enqueue(settings, factory, iteration.id, Step.RETURNS)  # only after the commit
    return _out(session, iteration)


@router.get("", response_model=list[schemas.IterationOut])
def list_iterations(session: SessionDep, _: OperatorDep) -> list[schemas.IterationOut]:
    return [schemas.IterationOut.model_validate(i) for i in repository.list_iterations(session)]


@router.get("/{iteration_id}", response_model=schemas.IterationOut)
def get_iteration(iteration_id: str, session: SessionDep, _: OperatorDep) -> schemas.IterationOut:
    return schemas.IterationOut.model_validate(
        service.get_iteration(session, iteration_id=iteration_id)
    )


@router.post("/{iteration_id}/approve", response_model=schemas.IterationOut)
def approve(
    iteration_id: str,
    session: SessionDep,
    settings: SettingsDep,
    factory: FactoryDep,
    _: OperatorDep,
) -> schemas.IterationOut:
    iteration = service.approve(session, iteration_id=iteration_id)
    session.commit()
    enqueue(settings, factory, iteration.id, Step.DEPLOY)
    return _out(session, iteration)


@router.post("/{iteration_id}/reject", response_model=schemas.IterationOut)
def reject(iteration_id: str, session: SessionDep, _: OperatorDep) -> schemas.IterationOut:
    iteration = service.reject(session, iteration_id=iteration_id)
    session.commit()
    return _out(session, iteration)


@router.post("/{iteration_id}/cancel", response_model=schemas.IterationOut)
def cancel(iteration_id: str, session: SessionDep, _: OperatorDep) -> schemas.IterationOut:
    iteration = service.cancel(session, iteration_id=iteration_id)
    session.commit()
    return _out(session, iteration)


@router.post("/{iteration_id}/retry", response_model=schemas.IterationOut)
def retry(
    iteration_id: str,
    body: schemas.RetryRequest,
    session: SessionDep,
    settings: SettingsDep,
    factory: FactoryDep,
    _: OperatorDep,
) -> schemas.IterationOut:
    step = service.retry(session, iteration_id=iteration_id, override_gate=body.override_gate)
    session.commit()
    enqueue(settings, factory, iteration_id, step)
    return _out(session, service.get_iteration(session, iteration_id=iteration_id))
