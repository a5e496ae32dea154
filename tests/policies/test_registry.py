"""The policy registry: versions are immutable, lineage is kept, status moves by the rules."""

from __future__ import annotations

import uuid

import pytest

from services.db import session_scope
from services.errors import Conflict, Invalid
from services.policies.models import PolicyStatus
from services.policies.service import lineage, register_policy, transition
from tests.conftest import Store


def test_versions_lineage_and_transitions(store: Store) -> None:
    p0, p1 = f"p0-{uuid.uuid4().hex[:6]}", f"p1-{uuid.uuid4().hex[:6]}"
    with session_scope(store.factory) as session:
        register_policy(
            session, policy_id=p0, base_model="/m", adapter_uri="/a0", status=PolicyStatus.APPROVED
        )
        register_policy(
            session,
            policy_id=p1,
            base_model="/m",
            adapter_uri="/a1",
            parent_id=p0,
            iteration_id="it-1",
            config={"algorithm": "ppo", "beta": 0.05},
        )
        # Registering the same version again is a no-op; other weights under it are refused.
        assert register_policy(session, policy_id=p1, base_model="/m", adapter_uri="/a1").id == p1
        with pytest.raises(Conflict, match="never reused"):
            register_policy(session, policy_id=p1, base_model="/m", adapter_uri="/other")
        with pytest.raises(Invalid, match="base model"):
            register_policy(
                session, policy_id=f"x-{p1}", base_model="/other", adapter_uri="/a", parent_id=p0
            )
        with pytest.raises(Invalid, match="not registered"):
            register_policy(
                session, policy_id=f"y-{p1}", base_model="/m", adapter_uri="/a", parent_id="nobody"
            )
        with pytest.raises(Invalid, match="policy id"):
            register_policy(session, policy_id="Bad Id", base_model="/m", adapter_uri="/a")
        assert [p.id for p in lineage(session, policy_id=p1)] == [p1, p0]

        assert transition(session, policy_id=p1, to=PolicyStatus.APPROVED).status == "approved"
        with pytest.raises(Conflict, match="cannot become"):
            transition(session, policy_id=p1, to=PolicyStatus.REJECTED)
        transition(session, policy_id=p1, to=PolicyStatus.RETIRED)
        assert transition(session, policy_id=p1, to=PolicyStatus.APPROVED).status == "approved"
