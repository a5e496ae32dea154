"""Policy improvement step of Iterative PPO: pi_i -> pi_{i+1} against a learned Q^pi(s, a).

`improve_policy` runs our own token-level PPO (`ppo.py`) and TRL's RLOO and GRPO
(`rl_trl.py`). Each prompt is a logged conversation state; the policy samples a business reply;
`reward_fn` (Q^pi) scores each sampled reply; a KL penalty keeps pi_{i+1} close to pi_i.
`improve_offline` is the fully offline alternative, from logged preferences with pi_i as the
reference and no Q: DMPO on (winner, loser) conversation pairs (`dmpo.py`) and DPO on the
business's edits of suggestions (`dpo.py`). Both write the adapter the same way.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from workers.learning.chat import ChatMessage
from workers.learning.configs import DMPOConfig, DPOConfig, GRPOConfig, PPOConfig, RLOOConfig
from workers.learning.policy_model import ProgressFn, RewardFn
from workers.learning.preferences import EditPair, PreferencePair

log = logging.getLogger(__name__)

Algorithm = Literal["ppo", "rloo", "grpo"]
OfflineAlgorithm = Literal["dmpo", "dpo"]

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
    """Train pi_{i+1} from pi_i = base_model + parent_adapter against Q and save it to
    output_dir (see `_staged` for how it is written)."""
    expected = {"ppo": PPOConfig, "rloo": RLOOConfig, "grpo": GRPOConfig}[algorithm]
    if not isinstance(config, expected):
        raise ValueError(f"algorithm {algorithm!r} needs a {expected.__name__}, got {config!r}")
    if not prompts:
        raise ValueError("no prompts to improve the policy on")

    def train(staging: Path, report: ProgressFn) -> tuple[dict[str, float], list[dict[str, float]]]:
        if isinstance(config, PPOConfig):
            from workers.learning.ppo import train_ppo

            return train_ppo(
                base_model=base_model,
                parent_adapter=parent_adapter,
                prompts=prompts,
                reward_fn=reward_fn,
                config=config,
                output_dir=staging,
                progress=report,
            )
        from workers.learning.rl_trl import train_trl

        return train_trl(
            base_model=base_model,
            parent_adapter=parent_adapter,
            prompts=prompts,
            reward_fn=reward_fn,
            config=config,
            output_dir=staging,
            progress=report,
        )

    log.info("improving %s with %s on %d prompts", parent_adapter, algorithm, len(prompts))
    return _staged(algorithm, parent_adapter, config, output_dir, progress, train)


def improve_offline(
    *,
    algorithm: OfflineAlgorithm,
    base_model: Path,
    parent_adapter: Path,
    data: Sequence[PreferencePair] | Sequence[EditPair],
    config: DMPOConfig | DPOConfig,
    output_dir: Path,
    progress: ProgressFn | None = None,
) -> ImproveResult:
    """Train pi_{i+1} from pi_i on logged preferences, no sampling and no Q: DMPO on
    (winner, loser) conversation pairs, or DPO on the business's edits of suggestions."""
    expected = {"dmpo": DMPOConfig, "dpo": DPOConfig}[algorithm]
    if not isinstance(config, expected):
        raise ValueError(f"algorithm {algorithm!r} needs a {expected.__name__}, got {config!r}")
    if not data:
        what = "conversation pairs" if algorithm == "dmpo" else "edited or rejected suggestions"
        raise ValueError(f"no {what} to improve the policy on")

    def train(staging: Path, report: ProgressFn) -> tuple[dict[str, float], list[dict[str, float]]]:
        if isinstance(config, DMPOConfig):
            from workers.learning.dmpo import train_dmpo

            pairs = [p for p in data if isinstance(p, PreferencePair)]
            return train_dmpo(
                base_model=base_model,
                parent_adapter=parent_adapter,
                pairs=pairs,
                config=config,
                output_dir=staging,
                progress=report,
            )
        from workers.learning.dpo import train_dpo

        edits = [e for e in data if isinstance(e, EditPair)]
        return train_dpo(
            base_model=base_model,
            parent_adapter=parent_adapter,
            edits=edits,
            config=config,
            output_dir=staging,
            progress=report,
        )

    log.info("improving %s with %s on %d preferences", parent_adapter, algorithm, len(data))
    return _staged(algorithm, parent_adapter, config, output_dir, progress, train)


def _staged(
    algorithm: str,
    parent_adapter: Path,
    config: Any,
    output_dir: Path,
    progress: ProgressFn | None,
    train: Callable[[Path, ProgressFn], tuple[dict[str, float], list[dict[str, float]]]],
) -> ImproveResult:
    """Run `train` into a sibling `.part` directory and rename it into place at the end, so
    output_dir either holds a complete adapter or does not exist. An existing non-empty
    output_dir is refused: whether to reuse it is the caller's decision."""
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
    metrics, history = train(staging, report)
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
