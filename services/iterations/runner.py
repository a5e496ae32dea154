"""Where an iteration's steps run: the `StepRunner` the API, the CLI and the demo are handed.

This module is the API's side of the step queue. It names the Celery task and routes steps to
queues, but sends by name: the API process never imports the workers (workers/celery_app.py
imports these names from here). The in-process runners live above, in workers/runner.py.
"""

from __future__ import annotations

from typing import Any, Protocol

from services.iterations.models import Step
from services.settings import Settings

STEP_TASK = "outcomeloop.iterations.run_step"
CHECK_TASK = "outcomeloop.iterations.check_new_data"
# Q fitting and policy improvement use the accelerator they find; the rest is light CPU work.
GPU_STEPS = frozenset({Step.FIT_Q, Step.IMPROVE, Step.CHECK})


def queue_for(step: Step) -> str:
    return "gpu" if step in GPU_STEPS else "cpu"


class StepRunner(Protocol):
    def submit(self, iteration_id: str, step: Step) -> None:
        """Start `step` of the iteration. Call only after the transaction that made the step due
        has committed: the step reloads the iteration and re-checks its state."""


def celery_client(settings: Settings) -> Any:
    """A Celery app on the configured broker, JSON only: the producer side of the step queue
    (the workers' app in workers/celery_app.py starts from this one)."""
    from celery import Celery  # only the Celery runner needs it

    client = Celery("outcomeloop", broker=settings.redis_url)
    client.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_default_queue="cpu",
        broker_connection_retry_on_startup=True,
        # A broker that is down fails a send within seconds (the API answers 503 and the
        # iteration can be retried) instead of holding the request for the default ~16 s.
        broker_connection_timeout=2,
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        # Above the longest step, or Redis redelivers a step that is still running.
        broker_transport_options={"visibility_timeout": settings.celery_visibility_timeout_s},
    )
    return client


class CeleryRunner:
    """Steps run on Celery workers: each is sent by task name with two ids (JSON)."""

    def __init__(self, settings: Settings, *, client: Any = None) -> None:
        self._client = client if client is not None else celery_client(settings)

    def submit(self, iteration_id: str, step: Step) -> None:
        self._client.send_task(STEP_TASK, args=[iteration_id, step.value], queue=queue_for(step))
