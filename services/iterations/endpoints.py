"""Operator jobs API for policy iterations (shaped like a fine-tuning jobs API)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, status
from sqlalchemy.orm import Session

from services.deps import OperatorDep, SessionDep, SettingsDep
from services.errors import Unavailable
from services.iterations import repository, schemas, service
from services.iterations.models import Iteration, Step
from services.iterations.runner import StepRunner
from services.pages import MAX_INT_CURSOR, AfterQuery, LimitQuery, Page, unknown_cursor

router = APIRouter(prefix="/v1/iterations", tags=["operator"])


def get_runner(request: Request) -> StepRunner:
    """Where this app runs iteration steps (handed to create_app); 503 if nowhere."""
    runner: StepRunner | None = request.app.state.runner
    if runner is None:
        raise Unavailable(
            "this API runs no iteration steps: on the embedded default (OUTCOMELOOP_TASK_RUNNER="
            "inline) steps run in the API process, so start it with `outcomeloop serve` (or "
            "`uvicorn services.cli:api_app --factory`), which hands it a runner; or set "
            "OUTCOMELOOP_TASK_RUNNER=celery and run Celery workers"
        )
    return runner


RunnerDep = Annotated[StepRunner, Depends(get_runner)]


def _out(session: Session, iteration: Iteration) -> schemas.IterationOut:
    session.refresh(iteration)
    return schemas.IterationOut.model_validate(iteration)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.IterationOut)
def create_iteration(
    body: schemas.IterationCreate,
    session: SessionDep,
    settings: SettingsDep,
    _: OperatorDep,
    runner: RunnerDep,
) -> schemas.IterationOut:
    iteration = service.create_iteration(session, settings=settings, request=body)
    session.commit()
    service.dispatch(session, runner, iteration_id=iteration.id, step=Step.RETURNS)
    return _out(session, iteration)


@router.get("/schema")
def request_schema(_: OperatorDep) -> dict[str, Any]:
    """The JSON schema of POST /v1/iterations: every config field, its type, default and help."""
    return schemas.iteration_request_schema()


@router.get("", response_model=Page[schemas.IterationOut])
def list_iterations(
    session: SessionDep, _: OperatorDep, after: AfterQuery = None, limit: LimitQuery = 100
) -> Page[schemas.IterationOut]:
    """Iterations, newest first."""
    try:
        rows, has_more = repository.page_iterations(session, after=after, limit=limit)
    except LookupError:
        raise unknown_cursor("iteration", str(after)) from None
    return Page(data=[schemas.IterationOut.model_validate(i) for i in rows], has_more=has_more)


@router.get("/{iteration_id}", response_model=schemas.IterationOut)
def get_iteration(iteration_id: str, session: SessionDep, _: OperatorDep) -> schemas.IterationOut:
    return schemas.IterationOut.model_validate(
        service.get_iteration(session, iteration_id=iteration_id)
    )


@router.get("/{iteration_id}/events", response_model=Page[schemas.EventOut])
def list_events(
    iteration_id: str,
    session: SessionDep,
    _: OperatorDep,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_INT_CURSOR, description="The last seq of the previous page.")
    ] = None,
    limit: LimitQuery = 100,
) -> Page[schemas.EventOut]:
    """The iteration's events in order (progress, gate results, the approval summary)."""
    service.get_iteration(session, iteration_id=iteration_id)  # 404 when unknown
    rows, has_more = repository.page_events(
        session, iteration_id=iteration_id, after=after, limit=limit
    )
    return Page(data=[schemas.EventOut.model_validate(e) for e in rows], has_more=has_more)


@router.post("/{iteration_id}/approve", response_model=schemas.IterationOut)
def approve(
    iteration_id: str, session: SessionDep, operator: OperatorDep, runner: RunnerDep
) -> schemas.IterationOut:
    iteration = service.approve(session, iteration_id=iteration_id, actor=operator.key_id)
    session.commit()
    service.dispatch(session, runner, iteration_id=iteration.id, step=Step.DEPLOY)
    return _out(session, iteration)


@router.post("/{iteration_id}/reject", response_model=schemas.IterationOut)
def reject(iteration_id: str, session: SessionDep, operator: OperatorDep) -> schemas.IterationOut:
    iteration = service.reject(session, iteration_id=iteration_id, actor=operator.key_id)
    session.commit()
    return _out(session, iteration)


@router.post("/{iteration_id}/cancel", response_model=schemas.IterationOut)
def cancel(iteration_id: str, session: SessionDep, operator: OperatorDep) -> schemas.IterationOut:
    iteration = service.cancel(session, iteration_id=iteration_id, actor=operator.key_id)
    session.commit()
    return _out(session, iteration)


@router.post("/{iteration_id}/retry", response_model=schemas.IterationOut)
def retry(
    iteration_id: str,
    body: schemas.RetryRequest,
    session: SessionDep,
    _: OperatorDep,
    runner: RunnerDep,
) -> schemas.IterationOut:
    step = service.retry(session, iteration_id=iteration_id, override_gate=body.override_gate)
    session.commit()
    service.dispatch(session, runner, iteration_id=iteration_id, step=step)
    return _out(session, service.get_iteration(session, iteration_id=iteration_id))
