"""POST /v1/conversations/{id}/suggestions: plan (commit), generate (no transaction), record."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status

from services import metrics
from services.conversations.models import Suggestion
from services.deps import BusinessIdDep, SessionDep, SettingsDep
from services.errors import Invalid
from services.generation.base import GenerationBackend
from services.suggestions import schemas, service

router = APIRouter(prefix="/v1/conversations", tags=["suggestions"])


def get_backend(request: Request) -> GenerationBackend:
    backend: GenerationBackend = request.app.state.backends.get()
    return backend


BackendDep = Annotated[GenerationBackend, Depends(get_backend)]


def _out(rows: list[Suggestion], result: service.Suggested) -> schemas.SuggestionOut:
    first = rows[0]
    return schemas.SuggestionOut(
        suggestion_id=first.id,
        text=first.text,
        policy=first.policy_version or result.plan.adapter.name,
        arm=first.arm or result.plan.arm,
        experiment_id=first.experiment_id or result.plan.experiment_id,
        persona=first.persona,
        latency_ms=first.latency_ms,
        truncated=result.dropped_turns > 0,
        dropped_turns=result.dropped_turns,
        fallback=result.fallback,
        candidates=[
            schemas.Candidate(suggestion_id=r.id, text=r.text, logprob=r.logprob) for r in rows
        ],
    )


@router.post(
    "/{conversation_id}/suggestions",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.SuggestionOut,
)
def suggest(
    conversation_id: str,
    body: schemas.SuggestionCreate,
    session: SessionDep,
    settings: SettingsDep,
    business_id: BusinessIdDep,
    backend: BackendDep,
    response: Response,
) -> schemas.SuggestionOut:
    if body.n > settings.max_candidates:
        raise Invalid(f"n={body.n} exceeds the limit {settings.max_candidates}")
    plan = service.plan(
        session,
        settings=settings,
        business_id=business_id,
        conversation_id=conversation_id,
        n=body.n,
        client_request_id=body.client_request_id,
        temperature=body.temperature,
        max_new_tokens=body.max_new_tokens,
    )
    session.commit()  # the arm assignment stands even if generation fails
    if plan.replay:
        response.headers["Idempotent-Replayed"] = "true"
        return _out(plan.replay, service.Suggested(plan.replay, plan, 0, replayed=True))
    labels = {"arm": plan.arm, "backend": backend.name}
    try:
        generated = service.run(backend, plan, settings=settings)
    except Exception:
        metrics.SUGGESTIONS.labels(**labels, result="error").inc()
        raise
    result = service.record(
        session, settings=settings, the_plan=plan, generated=generated, backend_name=backend.name
    )
    session.commit()
    outcome = "fallback" if result.fallback else ("abstain" if generated.texts[0] is None else "ok")
    metrics.SUGGESTIONS.labels(**labels, result=outcome).inc()
    metrics.SUGGESTION_LATENCY.labels(**labels).observe(generated.latency_ms / 1000)
    response.headers["Idempotent-Replayed"] = "true" if result.replayed else "false"
    return _out(result.suggestions, result)
