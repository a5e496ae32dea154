"""The one Celery app: Redis broker, JSON only, late acks for idempotent steps.

Queues: `cpu` (returns, Q evaluation, registry, deploy) and `gpu` (Q fit and policy
improvement: they use the device they find, CUDA when present). Start workers with
`celery -A workers.celery_app worker -Q cpu` and `-Q gpu` (one machine: `-Q cpu,gpu`),
beat with `celery -A workers.celery_app beat`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from services.settings import Settings, get_settings

STEP_TASK = "outcomeloop.iterations.run_step"
CHECK_TASK = "outcomeloop.iterations.check_new_data"
GPU_STEPS = {"fit_q", "improve"}


def queue_for(step: str) -> str:
    return "gpu" if step in GPU_STEPS else "cpu"


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("outcomeloop", broker=settings.redis_url, include=["workers.tasks"])
    celery.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,  # a step is redelivered if its worker dies mid-way
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # steps are long: never hold one while running another
        task_default_queue="cpu",
        broker_connection_retry_on_startup=True,
        # Above the longest step, or Redis redelivers a step that is still running.
        broker_transport_options={"visibility_timeout": settings.celery_visibility_timeout_s},
        beat_schedule={
            "check-new-data": {"task": CHECK_TASK, "schedule": settings.beat_interval_s}
        },
        worker_hijack_root_logger=False,
    )
    return celery


app = make_app()
_clients: dict[str, Celery] = {}


def send_step(
    iteration_id: str, step: str, *, settings: Settings | None = None, **options: Any
) -> None:
    """Enqueue a step (JSON: two ids). `settings` names another broker than this process's."""
    client = app
    if settings is not None and settings.redis_url != app.conf.broker_url:
        client = _clients.setdefault(settings.redis_url, make_app(settings))
    client.send_task(STEP_TASK, args=[iteration_id, step], queue=queue_for(step), **options)
