"""HTTP mapping of the conversation log (thin: parse, call the service, commit, answer)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from services import metrics
from services.conversations import schemas, service
from services.deps import BusinessIdDep, SessionDep, SettingsDep
from services.experiments.service import arm_labels

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])

REPLAYED_HEADER = "Idempotent-Replayed"


def _mark(response: Response, replayed: bool) -> None:
    response.headers[REPLAYED_HEADER] = "true" if replayed else "false"


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.ConversationSummary)
def create_conversation(
    body: schemas.ConversationCreate,
    session: SessionDep,
    business_id: BusinessIdDep,
    settings: SettingsDep,
    response: Response,
) -> schemas.ConversationSummary:
    written = service.create_conversation(
        session,
        business_id=business_id,
        client_conversation_id=body.client_conversation_id,
        meta=body.metadata,
        settings=settings,
    )
    session.commit()
    _mark(response, written.replayed)
    return schemas.ConversationSummary.model_validate(written.row)


@router.get("/{conversation_id}", response_model=schemas.ConversationOut)
def get_conversation(
    conversation_id: str, session: SessionDep, business_id: BusinessIdDep
) -> schemas.ConversationOut:
    conversation = service.get_conversation(
        session, business_id=business_id, conversation_id=conversation_id
    )
    return schemas.ConversationOut.model_validate(conversation)


@router.post(
    "/{conversation_id}/messages",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.MessageOut,
)
def append_message(
    conversation_id: str,
    body: schemas.MessageCreate,
    session: SessionDep,
    settings: SettingsDep,
    business_id: BusinessIdDep,
    response: Response,
) -> schemas.MessageOut:
    written = service.append_message(
        session,
        settings=settings,
        business_id=business_id,
        conversation_id=conversation_id,
        role=body.role,
        text=body.text,
        suggestion_id=body.suggestion_id,
        client_message_id=body.client_message_id,
    )
    session.commit()
    _mark(response, written.replayed)
    if not written.replayed:
        metrics.record_message(written.row, written.arm)
    return schemas.MessageOut.model_validate(written.row)


@router.post(
    "/{conversation_id}/outcome",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.OutcomeOut,
)
def record_outcome(
    conversation_id: str,
    body: schemas.OutcomeCreate,
    session: SessionDep,
    business_id: BusinessIdDep,
    response: Response,
) -> schemas.OutcomeOut:
    written = service.record_outcome(
        session,
        business_id=business_id,
        conversation_id=conversation_id,
        label=body.label,
        message_id=body.message_id,
        client_event_id=body.client_event_id,
    )
    session.commit()
    _mark(response, written.replayed)
    if not written.replayed:
        conversation = service.get_conversation(
            session, business_id=business_id, conversation_id=conversation_id
        )
        experiment, arm = arm_labels(session, arm_id=conversation.arm_id)
        metrics.OUTCOMES.labels(experiment=experiment, arm=arm).inc()
    return schemas.OutcomeOut.model_validate(written.row)


@router.post("/{conversation_id}/close", response_model=schemas.ConversationSummary)
def close_conversation(
    conversation_id: str,
    body: schemas.CloseRequest,
    session: SessionDep,
    business_id: BusinessIdDep,
    response: Response,
) -> schemas.ConversationSummary:
    written = service.close_conversation(
        session, business_id=business_id, conversation_id=conversation_id, reason=body.reason
    )
    session.commit()
    _mark(response, written.replayed)
    if not written.replayed:
        experiment, arm = arm_labels(session, arm_id=written.row.arm_id)
        metrics.CONVERSATIONS_ENDED.labels(
            experiment=experiment, arm=arm, reason=body.reason.value
        ).inc()
    return schemas.ConversationSummary.model_validate(written.row)
