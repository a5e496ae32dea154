"""The one Celery app: Redis broker, JSON only, late acks for idempotent steps.

Queues: `cpu` (returns, Q evaluation, registry, deploy) and `gpu` (Q fit and policy
improvement: they use the device they find, CUDA when present). Start workers with
`celery -A workers.celery_app worker -Q cpu` and `-Q gpu` (one machine: `-Q cpu,gpu`),
beat with `celery -A workers.celery_app beat`. Task names and queue routing are the API's
(services/iterations/runner.py), which sends steps by name without importing this module.
"""

from __future__ import annotations

from typing import Any

from services.experiments.decisions import GUARDRAIL_TASK
from services.iterations.runner import CHECK_TASK, celery_client
from services.settings import Settings, get_settings


def make_app(settings: Settings | None = None) -> Any:
    settings = settings or get_settings()
    celery = celery_client(settings)
    celery.conf.update(
        include=["workers.tasks"],
        task_acks_late=True,  # a step is redelivered if its worker dies mid-way
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # steps are long: never hold one while running another
        beat_schedule={
            "check-new-data": {"task": CHECK_TASK, "schedule": settings.beat_interval_s},
            "check-guardrails": {"task": GUARDRAIL_TASK, "schedule": settings.beat_interval_s},
        },
        worker_hijack_root_logger=False,
    )
    return celery


app = make_app()
