"""Thin, named, JSON-only Celery tasks over workers.pipeline. Tasks take ids."""

from __future__ import annotations

import logging
from functools import lru_cache

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from services import models as _all_tables  # noqa: F401  (every table known to the ORM)
from services.db import make_engine, make_session_factory, session_scope
from services.experiments.decisions import GUARDRAIL_TASK
from services.iterations.models import Step
from services.iterations.runner import CHECK_TASK, STEP_TASK, CeleryRunner
from services.iterations.service import dispatch, stalled_iterations
from services.settings import get_settings
from workers.celery_app import app

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def session_factory() -> sessionmaker[Session]:
    settings = get_settings()
    return make_session_factory(make_engine(settings.sqlalchemy_url, pool_size=2))


@lru_cache(maxsize=1)
def runner() -> CeleryRunner:
    """The next step goes to the queue this worker reads from, through the same app."""
    return CeleryRunner(get_settings(), client=app)


@app.task(
    name=STEP_TASK,
    bind=True,
    acks_late=True,
    autoretry_for=(OperationalError,),  # the database blinked: transient
    retry_backoff=True,
    max_retries=10,
)
def run_step(self, iteration_id: str, step: str) -> None:  # type: ignore[no-untyped-def]
    from workers.pipeline import StepBusy
    from workers.pipeline import run_step as run

    try:
        following = run(session_factory(), get_settings(), iteration_id, Step(step))
    except StepBusy as exc:
        log.info("%s; retrying later", exc)
        raise self.retry(countdown=30, max_retries=None) from None
    if following is not None:
        with session_scope(session_factory()) as session:
            # a broker that is down now fails the iteration at `following` (retry resumes it)
            dispatch(session, runner(), iteration_id=iteration_id, step=following)


@app.task(name=CHECK_TASK)
def check_new_data() -> str | None:
    """Beat: start an iteration when enough new conversations ended (it stops before approval)."""
    from services.iterations.triggers import maybe_start_iteration

    settings = get_settings()
    with session_scope(session_factory()) as session:
        # Queued longer than the broker keeps an unacknowledged message: the step was lost.
        stalled = stalled_iterations(
            session, older_than_s=max(settings.celery_visibility_timeout_s, settings.step_lease_s)
        )
    for stalled_id, step in stalled:
        log.warning(
            "iteration %s was queued at %s and lost its step: queued again", stalled_id, step
        )
        with session_scope(session_factory()) as session:
            dispatch(session, runner(), iteration_id=stalled_id, step=step)
    with session_scope(session_factory()) as session:
        iteration_id = maybe_start_iteration(session, settings=settings)
    if iteration_id is not None:
        with session_scope(session_factory()) as session:
            dispatch(session, runner(), iteration_id=iteration_id, step=Step.RETURNS)
    return iteration_id


@app.task(name=GUARDRAIL_TASK)
def check_guardrails() -> list[str]:
    """Beat: roll back every running experiment whose treatment is significantly worse."""
    from services.experiments.decisions import check_all_guardrails

    with session_scope(session_factory()) as session:
        return check_all_guardrails(session)
