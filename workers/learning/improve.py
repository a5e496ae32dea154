"""Policy improvement step of Iterative PPO: pi_i -> pi_{i+1} against a learned Q^pi(s, a).

One entry point, `improve_policy`, over our own token-level PPO (`ppo.py`) and TRL's RLOO and
GRPO (`rl_trl.py`). Each prompt is a logged conversation state; the policy samples a business
reply; `reward_fn` (Q^pi) scores each sampled reply; a KL penalty keeps pi_{i+1} close to pi_i.

How pi_{i+1} relates to pi_i and the base model, in every algorithm:

* The trainable LoRA adapter is initialised with the parent adapter's weights (pi_i) and trained
  further, so the saved adapter *is* pi_{i+1} on the one base model: servable as an arm exactly,
  no stacking or merging approximation. Its LoRA shape is the parent's.
* The KL reference is pi_i = base + parent adapter, frozen (Theorem 2 of Jiang et al. 2025), not
  the base model. It is a second, frozen copy of the parent adapter on the same base weights (an
  adapter costs a few MB; a second model would double the memory): our PPO loads it as adapter
  "reference" and runs it with peft's per-row `adapter_names`; TRL (>= 1.x with peft >= 0.20)
  does the same by itself when handed a PeftModel, as adapter "ref". Only the trained adapter is
  saved.

Metrics: `history` has one dict per update (PPO) or optimiser step (TRL, with TRL's names);
all carry `q_mean` (mean Q of the sampled replies) and `kl_ref_per_token` (mean per-token
log-ratio to pi_i); `metrics` is the last entry plus `q_mean_first` and `seconds`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from workers.learning.chat import ChatMessage
from workers.learning.configs import GRPOConfig, PPOConfig, RLOOConfig
from workers.learning.policy_model import ProgressFn, RewardFn

log = logging.getLogger(__name__)

Algorithm = Literal["ppo", "rloo", "grpo"]

HISTORY_FILE = "improve_history.json"


@dataclass(frozen=True)
class ImproveResult:
    """Where pi_{i+1} was saved, summary metrics of the run, and one metrics dict per update."""

    adapter_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def improve_policy(
    *,
    algorithm: Algorithm,
    base_model: Path,
    parent_adapter: Path,
    prompts: Sequence[list[ChatMessage]],
    reward_fn: RewardFn,
    config: PPOConfig | RLOOConfig | GRPOConfig,
    output_dir: Path,
    progress: ProgressFn | None = None,
) -> ImproveResult:
    """Train pi_{i+1} from pi_i = base_model + parent_adapter and save it to output_dir.

    The adapter is written to a sibling `.part` directory and renamed into place at the end, so
    output_dir either holds a complete adapter or does not exist. An existing non-empty
    output_dir is refused: whether to reuse it is the caller's decision.
    """
    expected = {"ppo": PPOConfig, "rloo": RLOOConfig, "grpo": GRPOConfig}[algorithm]
    if not isinstance(config, expected):
        raise ValueError(f"algorithm {algorithm!r} needs a {expected.__name__}, got {config!r}")
    if not prompts:
        raise ValueError("no prompts to improve the policy on")
    if not (Path(parent_adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter at {parent_adapter}")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} already exists and is not empty")
    staging = output_dir.with_name(output_dir.name + ".part")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run of this same step
    staging.mkdir(parents=True)
    report = progress or (lambda _stage, _fraction: None)

    log.info("improving %s with %s on %d prompts", parent_adapter, algorithm, len(prompts))
    if isinstance(config, PPOConfig):
        from workers.learning.ppo import train_ppo

        metrics, history = train_ppo(
            base_model=base_model,
            parent_adapter=parent_adapter,
            prompts=prompts,
            reward_fn=reward_fn,
            config=config,
            output_dir=staging,
            progress=report,
        )
    else:
        from workers.learning.rl_trl import train_trl

        metrics, history = train_trl(
            base_model=base_model,
            parent_adapter=parent_adapter,
            prompts=prompts,
            reward_fn=reward_fn,
            config=config,
            output_dir=staging,
            progress=report,
        )
    record = {
        "algorithm": algorithm,
        "parent_adapter": str(parent_adapter),
        "config": asdict(config),
        "metrics": metrics,
        "history": history,
    }
    (staging / HISTORY_FILE).write_text(json.dumps(record, indent=2, default=str))
    if output_dir.exists():
        output_dir.rmdir()  # empty, checked above
    staging.rename(output_dir)
    report("done", 1.0)
    return ImproveResult(adapter_dir=output_dir, metrics=metrics, history=history)
