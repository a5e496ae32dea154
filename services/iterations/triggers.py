"""Beat's rule: enough newly ended conversations and nothing in flight -> a new iteration."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from services.conversations import repository as conversations
from services.errors import Conflict
from services.iterations import repository
from services.iterations.schemas import parse_iteration_request
from services.iterations.service import create_iteration
from services.settings import Settings

log = logging.getLogger(__name__)


def maybe_start_iteration(session: Session, *, settings: Settings) -> str | None:
    if repository.active_iterations(session):
        return None
    latest = repository.latest_iteration(session)
    since = latest.data_cutoff if latest is not None else None
    new = conversations.count_ended_since(session, since=since)
    if new < settings.beat_min_new_conversations:
        log.info(
            "%d new ended conversations; waiting for %d", new, settings.beat_min_new_conversations
        )
        return None
    try:
        # The defaults, validated like an operator's request.
        request = parse_iteration_request({"algorithm": "ppo"})
        iteration = create_iteration(session, settings=settings, request=request, trigger="beat")
    except Conflict as exc:  # nothing serving (nothing to improve), or served greedily
        log.warning("not starting an iteration: %s", exc.message)
        return None
    return iteration.id
