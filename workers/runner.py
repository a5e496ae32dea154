"""Step runners that run an iteration's steps in this process, and the one choice of runner.

The API, the CLI and the demo are handed a `StepRunner` (services/iterations/runner.py); only
their composition roots (services/cli.py, services/demo.py) import this module, because running
a step here means importing the pipeline and, when a step trains, torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from services.db import make_engine, make_session_factory
from services.iterations.models import Step
from services.iterations.runner import CeleryRunner, StepRunner
from services.settings import Settings
from workers.pipeline import run_inline

Heartbeat = Callable[[str], object]


def _own_factory(settings: Settings) -> sessionmaker[Session]:
    # Steps open short sessions of their own; a small pool keeps them off the caller's.
    return make_session_factory(make_engine(settings.sqlalchemy_url, pool_size=2))


class ThreadRunner:
    """Runs the remaining steps in a background thread and returns at once: the API on the
    embedded default. A process that exits mid-step leaves a lease that a retry takes over."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session] | None = None) -> None:
        self._settings = settings
        self._factory = factory or _own_factory(settings)

    def submit(self, iteration_id: str, step: Step) -> None:
        threading.Thread(
            target=run_inline,
            args=(self._factory, self._settings, iteration_id, step),
            name=f"iteration-{iteration_id[:8]}",
            daemon=True,
        ).start()


class BlockingRunner:
    """Runs the steps in the caller until the iteration blocks (awaiting approval) or ends: the
    CLI and the demo. With a `heartbeat`, the steps run in a helper thread so that the caller
    can call it (about once a second, with the iteration id) to show progress meanwhile."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session] | None = None,
        *,
        heartbeat: Heartbeat | None = None,
        interval_s: float = 1.0,
    ) -> None:
        self._settings = settings
        self._factory = factory or _own_factory(settings)
        self._heartbeat = heartbeat
        self._interval_s = interval_s

    def submit(self, iteration_id: str, step: Step) -> None:
        if self._heartbeat is None:
            run_inline(self._factory, self._settings, iteration_id, step)
            return
        failures: list[BaseException] = []

        def run() -> None:
            try:
                run_inline(self._factory, self._settings, iteration_id, step)
            except BaseException as exc:  # re-raised in the caller below
                failures.append(exc)

        thread = threading.Thread(target=run, name=f"iteration-{iteration_id[:8]}", daemon=True)
        thread.start()
        while thread.is_alive():
            self._heartbeat(iteration_id)
            thread.join(timeout=self._interval_s)
        self._heartbeat(iteration_id)
        if failures:
            raise failures[0]


def runner_for(
    settings: Settings,
    factory: sessionmaker[Session] | None = None,
    *,
    blocking: bool = False,
    heartbeat: Heartbeat | None = None,
) -> StepRunner:
    """The runner `settings.runner` names: Celery workers, or this process (in a background
    thread for a server, blocking for a command that must not exit before the steps are done)."""
    if settings.runner == "celery":
        return CeleryRunner(settings)
    if blocking:
        return BlockingRunner(settings, factory, heartbeat=heartbeat)
    return ThreadRunner(settings, factory)
