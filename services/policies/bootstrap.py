"""pi_0 in the registry, and a default experiment so that suggestions work out of the box."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from services.experiments import repository as experiments_repository
from services.experiments.models import GLOBAL_SCOPE
from services.experiments.service import ArmSpec, create_experiment
from services.policies.models import Policy, PolicyStatus
from services.policies.service import register_policy

PI0_ID = "pi0"


def ensure_pi0(
    session: Session, *, base_model: Path, adapter_dir: Path, lora: dict[str, object]
) -> tuple[Policy, str | None]:
    """Register pi_0 (approved) and, if nothing serves all businesses, a one-arm experiment.

    Returns the policy and the id of the experiment created, if one was.
    """
    policy = register_policy(
        session,
        policy_id=PI0_ID,
        base_model=str(base_model),
        adapter_uri=str(adapter_dir),
        status=PolicyStatus.APPROVED,
        config={"kind": "prompted base model behind a zero-initialised LoRA", "lora": lora},
        description="pi_0: the prompted instruct model",
    )
    if experiments_repository.running_for_scope(session, scope=GLOBAL_SCOPE) is not None:
        return policy, None
    experiment = create_experiment(session, name="default", arms=[ArmSpec("control", PI0_ID, 1.0)])
    return policy, experiment.id
