"""A small synthetic log where the business's wording decides the outcome: enough signal for
Q to learn on a tiny model, and the same shape as real traffic (imported JSONL)."""

from __future__ import annotations

import json
import random
from typing import Any

GOOD = ["Shall we book a visit on Monday?", "I can book you in tomorrow, does 10am work?"]
BAD = ["Please wait.", "We are busy, maybe later."]
OPENERS = ["Hi, do you renovate kitchens?", "How much is a new bathroom?", "Can you help me?"]


def scenario_lines(business_id: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        good = rng.random() < 0.5
        reply = rng.choice(GOOD if good else BAD)
        messages = [
            {"role": "customer", "text": rng.choice(OPENERS)},
            {"role": "business", "text": reply, "suggestion": reply},
            {"role": "customer", "text": "Ok, sounds good." if good else "Never mind."},
        ]
        if good:
            messages[-1]["outcome"] = True
        lines.append(
            json.dumps(
                {
                    "id": f"s{seed}-{i}",
                    "business_id": business_id,
                    "messages": messages,
                    "end": "outcome" if good else "customer_left",
                }
            )
        )
    return lines


def write_policy_logs(
    store: Any,
    business_id: str,
    policy_id: str,
    n: int,
    *,
    seed: int = 0,
    epsilon: float = 0.0,
    good_rate: float = 0.5,
    rewrite: float = 0.0,
) -> list[str]:
    """The scenario as the suggestion API logs it under `policy_id`: each business reply is the
    policy's suggestion, sent as is (with an exploration persona drawn with probability
    epsilon), except that with probability `rewrite` a bad suggestion is replaced by a good
    reply the business writes itself; returns the conversation ids."""
    from services.conversations import service as log
    from services.conversations.models import EndReason, Speaker
    from services.db import session_scope
    from services.tenants.service import ensure_business

    rng = random.Random(seed)
    ids = []
    with session_scope(store.factory) as session:
        ensure_business(session, business_id=business_id)
        for _ in range(n):
            good = rng.random() < good_rate
            reply = rng.choice(GOOD if good else BAD)
            suggested = reply
            if not good and rewrite and rng.random() < rewrite:
                good, reply = True, rng.choice(GOOD)
            explored = rng.random() < epsilon
            cid = log.create_conversation(session, business_id=business_id).row.id
            common = {
                "settings": store.settings,
                "business_id": business_id,
                "conversation_id": cid,
            }
            log.append_message(session, role=Speaker.CUSTOMER, text=rng.choice(OPENERS), **common)
            suggestion = log.record_suggestion(
                session,
                text=suggested,
                policy_version=policy_id,
                persona={"name": "brief", "instruction": "Be brief."} if explored else None,
                propensity=epsilon / 2 if explored else 1.0 - epsilon,
                **common,
            ).row.id
            log.append_message(
                session, role=Speaker.BUSINESS, text=reply, suggestion_id=suggestion, **common
            )
            log.append_message(
                session,
                role=Speaker.CUSTOMER,
                text="Ok, sounds good." if good else "Never mind.",
                **common,
            )
            if good:
                log.record_outcome(session, business_id=business_id, conversation_id=cid)
            log.close_conversation(
                session,
                business_id=business_id,
                conversation_id=cid,
                reason=EndReason.OUTCOME if good else EndReason.CUSTOMER_LEFT,
            )
            ids.append(cid)
    return ids
