"""Send an iteration's next step to where steps run: Celery workers, or this process.

Called only after the transaction that made the step runnable has committed.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from services.iterations.models import Step
from services.settings import Settings

log = logging.getLogger(__name__)


def enqueue(
    settings: Settings, session_factory: sessionmaker[Session], iteration_id: str, step: Step
) -> None:
    if settings.runner == "celery":
        from workers.celery_app import send_step

        send_step(iteration_id, step.value, settings=settings)
        return
    # Embedded default: run the remaining steps in a background thread of this process.
    from workers.pipeline import run_inline

    thread = threading.Thread(
        target=run_inline,
        args=(session_factory, settings, iteration_id, step),
        name=f"iteration-{iteration_id[:8]}",
        daemon=True,
    )
    thread.start()
