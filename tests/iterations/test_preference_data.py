"""What DMPO and DPO read from the log, on both stores: conversations cut at the outcome with
what the business sent, and the suggestions it edited or replaced before the outcome."""

from __future__ import annotations

import uuid
from datetime import timedelta

from services.conversations import service as log
from services.conversations.models import EndReason, Speaker
from services.db import session_scope, utcnow
from services.iterations.dataset import preference_data
from services.tenants.service import ensure_business
from tests.conftest import Store
from workers.learning.chat import Turn
from workers.learning.returns import ReturnsConfig


def test_preference_data_cuts_at_the_outcome_and_finds_the_edits(store: Store) -> None:
    business = f"pd-{uuid.uuid4().hex[:8]}"
    with session_scope(store.factory) as session:
        ensure_business(session, business_id=business)
        cid = log.create_conversation(session, business_id=business).row.id
        common = {"settings": store.settings, "business_id": business, "conversation_id": cid}

        def say(role: Speaker, text: str, suggested: str | None = None) -> None:
            suggestion = None
            if suggested is not None:
                suggestion = log.record_suggestion(
                    session, text=suggested, policy_version="p0", **common
                ).row.id
            log.append_message(session, role=role, text=text, suggestion_id=suggestion, **common)

        say(Speaker.CUSTOMER, "Do you renovate kitchens?")
        # replaced: nothing alike (rejected)
        say(Speaker.BUSINESS, "Yes! Shall we book a visit on Monday?", suggested="Please wait.")
        say(Speaker.BUSINESS, "I have 10am free.")  # the same business turn
        say(Speaker.CUSTOMER, "Monday works")
        # edited: close to the suggestion
        say(
            Speaker.BUSINESS,
            "Great, see you on Monday at 10am then.",
            suggested="Great, see you on Monday at 10am.",
        )
        log.record_outcome(session, business_id=business, conversation_id=cid)
        say(Speaker.CUSTOMER, "Thanks!")
        say(Speaker.BUSINESS, "Thank you!", suggested="Bye.")  # after the outcome: left out
        log.close_conversation(
            session, business_id=business, conversation_id=cid, reason=EndReason.OUTCOME
        )
        other = log.create_conversation(session, business_id=business).row.id
        log.append_message(
            session,
            settings=store.settings,
            business_id=business,
            conversation_id=other,
            role=Speaker.CUSTOMER,
            text="Hello?",
        )
        log.close_conversation(
            session, business_id=business, conversation_id=other, reason=EndReason.CUSTOMER_LEFT
        )

    with session_scope(store.factory) as session:
        data = preference_data(
            session,
            config=ReturnsConfig(business_id=business),
            cutoff=utcnow() + timedelta(seconds=1),
        )
    by_id = {c.conversation_id: c for c in data.conversations}
    won = by_id[cid]
    assert won.outcome == 1 and won.group == business and won.system
    assert won.turns == (
        Turn("customer", "Do you renovate kitchens?"),
        Turn("business", "Yes! Shall we book a visit on Monday?\nI have 10am free."),
        Turn("customer", "Monday works"),
        Turn("business", "Great, see you on Monday at 10am then."),
    )
    assert by_id[other].outcome == 0 and by_id[other].turns == (Turn("customer", "Hello?"),)
    edits = sorted(data.edits, key=lambda e: len(e.state))
    assert [(e.relation, e.chosen, e.rejected, len(e.state)) for e in edits] == [
        ("rejected", "Yes! Shall we book a visit on Monday?\nI have 10am free.", "Please wait.", 1),
        (
            "edited",
            "Great, see you on Monday at 10am then.",
            "Great, see you on Monday at 10am.",
            4,  # the logged messages before it (prompts merge the business's two)
        ),
    ]
    assert all(e.outcome == 1 for e in edits)
    assert data.counts() == {
        "conversations": 2,
        "with_outcome": 1,
        "edits_edited": 1,
        "edits_rejected": 1,
    }
