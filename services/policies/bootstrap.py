"""pi_0 in the registry, and a default experiment so that suggestions work out of the box."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from services.db import session_scope
from services.experiments import repository as experiments_repository
from services.experiments.models import GLOBAL_SCOPE
from services.experiments.service import ArmSpec, create_experiment
from services.policies.models import Policy, PolicyStatus
from services.policies.service import register_policy
from services.settings import Settings

PI0_ID = "pi0"


class PrepareError(RuntimeError):
    pass


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


def prepare(
    settings: Settings,
    factory: sessionmaker[Session],
    *,
    on_step: Callable[[str], None] = lambda _: None,
) -> tuple[Path, Path, str | None]:
    """Base model checkpoint, pi_0's zero adapter, registry entries. Idempotent.

    Returns (base model dir, pi_0 adapter dir, id of an experiment created now or None).
    """
    base = settings.base_model_path
    if settings.base_model is None:
        from workers.learning.model_prep import ModelPrepError, prepare_from_gguf

        try:
            prepare_from_gguf(base, on_step=on_step)
        except ModelPrepError as exc:
            raise PrepareError(str(exc)) from None
    elif not (base / "config.json").is_file():
        raise PrepareError(f"OUTCOMELOOP_BASE_MODEL={base} is not a Hugging Face checkpoint")
    from workers.learning.adapters import LoraSpec, create_zero_adapter

    spec = LoraSpec()
    adapter_dir = settings.adapters_dir / PI0_ID
    if not (adapter_dir / "adapter_config.json").is_file():
        on_step("pi0 adapter (zero-initialised LoRA)")
        create_zero_adapter(base, adapter_dir, spec)
    on_step("registry")
    with session_scope(factory) as session:
        _, experiment_id = ensure_pi0(
            session, base_model=base, adapter_dir=adapter_dir, lora=spec.as_dict()
        )
    return base, adapter_dir, experiment_id
