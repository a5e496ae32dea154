"""Suggesting in three steps, so that no database transaction stays open while the model runs:

1. `plan` (a transaction): check the conversation, fix its arm, draw an exploration persona;
2. `run` (no database): build the prompt within the context budget and call the backend;
3. `record` (a transaction): log every candidate with its policy, arm, persona, propensity,
   sampling parameters, log-probability and latency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from services.conversations import repository as conversations
from services.conversations import service as log_service
from services.conversations.models import Suggestion
from services.errors import Conflict, DomainError, NotFound
from services.experiments.assignment import explore
from services.experiments.service import serve_conversation
from services.generation.base import (
    AdapterRef,
    BackendError,
    BackendTimeout,
    GenerationBackend,
    GenerationRequest,
    SamplingParams,
)
from services.policies.prompt import Prompt, Turn, build_prompt, parse_completion, system_prompt
from services.settings import Settings
from services.tenants import repository as tenants


class BackendFailed(DomainError):
    status_code = 503


class BackendTimedOut(DomainError):
    status_code = 504


@dataclass(frozen=True)
class Plan:
    conversation_id: str
    business_id: str
    state_seq: int
    turns: list[Turn]
    system: str
    adapter: AdapterRef
    experiment_id: str
    arm: str
    arm_probability: float
    persona: dict[str, str] | None
    persona_probability: float
    sampling: SamplingParams
    client_request_id: str | None
    replay: list[Suggestion] = field(default_factory=list)


@dataclass(frozen=True)
class Generated:
    texts: list[str | None]
    logprobs: list[float | None]
    prompt: Prompt | None
    latency_ms: float
    error: str | None = None


@dataclass(frozen=True)
class Suggested:
    suggestions: list[Suggestion]
    plan: Plan
    dropped_turns: int
    replayed: bool
    fallback: str | None = None


def _request_ids(client_request_id: str | None, n: int) -> list[str] | None:
    if client_request_id is None:
        return None
    return [client_request_id] + [f"{client_request_id}#{i}" for i in range(2, n + 1)]


def plan(
    session: Session,
    *,
    settings: Settings,
    business_id: str,
    conversation_id: str,
    n: int = 1,
    client_request_id: str | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
) -> Plan:
    conversation = conversations.get_conversation(
        session, conversation_id=conversation_id, business_id=business_id, full=True
    )
    if conversation is None:
        raise NotFound(f"conversation {conversation_id} not found")
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens or settings.max_new_tokens,
        temperature=settings.temperature if temperature is None else temperature,
        top_p=settings.top_p,
        n=n,
    )
    request_ids = _request_ids(client_request_id, n)
    replay: list[Suggestion] = []
    if request_ids is not None:
        replay = conversations.suggestions_for_request(
            session, conversation_id=conversation.id, client_request_ids=request_ids
        )
    if not replay:
        if conversation.status == "closed":
            raise Conflict(f"conversation {conversation.id} is closed; nothing to suggest")
        last = conversation.messages[-1] if conversation.messages else None
        if settings.require_customer_turn and last is not None and last.role != "customer":
            raise Conflict(
                f"the latest message of conversation {conversation.id} (seq {last.seq}) is the "
                "business's; suggestions answer a customer message "
                "(OUTCOMELOOP_REQUIRE_CUSTOMER_TURN=false allows follow-ups)"
            )
    served = serve_conversation(session, conversation=conversation)
    business = tenants.get_business(session, business_id=business_id)
    assert business is not None
    state_seq = conversation.message_count
    choice = explore(
        served.experiment.exploration,
        served.experiment.salt,
        conversation.id,
        str(state_seq),
        client_request_id or str(len(conversation.suggestions)),
    )
    persona = (
        {"name": choice.persona.name, "instruction": choice.persona.instruction}
        if choice.persona
        else None
    )
    return Plan(
        conversation_id=conversation.id,
        business_id=business_id,
        state_seq=state_seq,
        turns=[Turn(m.role, m.text) for m in conversation.messages],
        system=system_prompt(
            business_name=business.name,
            business_prompt=business.system_prompt,
            persona_instruction=choice.persona.instruction if choice.persona else None,
        ),
        adapter=AdapterRef(served.policy.id, served.policy.adapter_uri),
        experiment_id=served.experiment.id,
        arm=served.arm.name,
        arm_probability=served.probability,
        persona=persona,
        persona_probability=choice.probability,
        sampling=sampling,
        client_request_id=client_request_id,
        replay=replay,
    )


def run(backend: GenerationBackend, the_plan: Plan, *, settings: Settings) -> Generated:
    """Generate the candidates; on backend failure either raise or abstain, per settings."""
    started = time.perf_counter()
    try:
        prompt = build_prompt(
            the_plan.turns,
            system=the_plan.system,
            count_tokens=backend.count_tokens,
            max_prompt_tokens=backend.max_context_tokens - the_plan.sampling.max_new_tokens,
        )
        result = backend.generate(
            GenerationRequest(prompt.messages, the_plan.adapter, the_plan.sampling),
            timeout=settings.generation_timeout_s,
        )
    except BackendError as exc:
        if settings.on_backend_error == "abstain":
            latency = (time.perf_counter() - started) * 1000
            return Generated([None], [None], None, latency, error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, BackendTimeout):
            raise BackendTimedOut(str(exc)) from None
        raise BackendFailed(f"the {backend.name} backend failed: {exc}") from None
    latency = (time.perf_counter() - started) * 1000
    return Generated(
        texts=[parse_completion(c.text) for c in result.completions],
        logprobs=[c.logprob for c in result.completions],
        prompt=prompt,
        latency_ms=latency,
    )


def record(
    session: Session,
    *,
    settings: Settings,
    the_plan: Plan,
    generated: Generated,
    backend_name: str,
) -> Suggested:
    request_ids = _request_ids(the_plan.client_request_id, len(generated.texts))
    sampling: dict[str, Any] = {**the_plan.sampling.as_dict(), "backend": backend_name}
    if generated.error is not None:
        sampling["fallback"] = "abstain_on_backend_error"
        sampling["error"] = generated.error[:500]
    rows: list[Suggestion] = []
    replayed = False
    for i, (text, logprob) in enumerate(zip(generated.texts, generated.logprobs, strict=True)):
        written = log_service.record_suggestion(
            session,
            settings=settings,
            business_id=the_plan.business_id,
            conversation_id=the_plan.conversation_id,
            text=text,
            policy_version=the_plan.adapter.name,
            arm=the_plan.arm,
            experiment_id=the_plan.experiment_id,
            sampling_params=sampling,
            persona=the_plan.persona,
            logprob=logprob,
            propensity=the_plan.persona_probability,
            latency_ms=round(generated.latency_ms, 3),
            client_request_id=request_ids[i] if request_ids else None,
            state_seq=the_plan.state_seq,
        )
        replayed = replayed or written.replayed
        rows.append(written.row)
    return Suggested(
        suggestions=rows,
        plan=the_plan,
        dropped_turns=generated.prompt.dropped_turns if generated.prompt else 0,
        replayed=replayed,
        fallback="abstain_on_backend_error" if generated.error else None,
    )
