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
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from workers.learning.chat import ChatMessage
from workers.learning.configs import GRPOConfig, PPOConfig, RLOOConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

RewardFn = Callable[[Sequence[list[ChatMessage]], Sequence[str]], list[float]]
ProgressFn = Callable[[str, float], None]
Algorithm = Literal["ppo", "rloo", "grpo"]

POLICY_ADAPTER = "default"  # peft saves the adapter named "default" at the directory's root
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


# -- helpers shared by ppo.py, rl_trl.py and the embedded server -----------------------------

# Every option of transformers' generate() that changes which token is drawn, at the value that
# leaves the distribution alone. generate() fills each option a call leaves unset from the
# model's generation_config.json, where a published model may ask for a repetition penalty,
# typical_p, min_p, ...: then neither the log-prob the embedded server logs with a suggestion
# nor the log-probs policy improvement scores would be those of the sampled distribution.
# These values do not change greedy decoding either, so they are pinned on every call. Options
# whose neutral value is None (min_p, top_h, min_new_tokens, suppress_tokens, ...) cannot be
# pinned by a call: `neutralise_generation_config` clears them in the model's own config.
# top_k is not here: its neutral value 0 is meaningful only when sampling (transformers warns
# otherwise), so every sampling call passes top_k=0 itself (transformers' default is 50).
NEUTRAL_GENERATION: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
}


def neutralise_generation_config(model: Any) -> None:
    """Replace model.generation_config, as read from generation_config.json, by transformers'
    plain defaults with NEUTRAL_GENERATION, keeping only the special token ids: generate() then
    samples softmax(logits / temperature), cut to top_p, and nothing else the model asks for."""
    from transformers import GenerationConfig

    loaded = model.generation_config
    neutral = GenerationConfig(
        bos_token_id=loaded.bos_token_id,
        eos_token_id=loaded.eos_token_id,
        pad_token_id=loaded.pad_token_id,
        **NEUTRAL_GENERATION,
    )
    model.generation_config = neutral


def resolve_device(device: str) -> str:
    """'auto' means CUDA when present, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_tokenizer(base_model: Path) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, padding on the left as generation needs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model), padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(base_model: Path, parent_adapter: Path, device: str) -> PeftModel:
    """The base model (float32, frozen) with the parent adapter as the trainable "default".

    The base's generation_config.json is set aside (see `neutralise_generation_config`): our
    PPO and TRL sample through generate(), which would otherwise apply whatever it asks for (a
    repetition penalty, min_p, ...) while the log-probs are scored as softmax(logits / T).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    neutralise_generation_config(base)
    model = PeftModel.from_pretrained(
        base, str(parent_adapter), adapter_name=POLICY_ADAPTER, is_trainable=True
    )
    return model.to(device)


def save_policy(model: PeftModel, output_dir: Path) -> None:
    """Save only the trained adapter, at the root of output_dir (peft's format)."""
    model.save_pretrained(str(output_dir), selected_adapters=[POLICY_ADAPTER])


def checked_rewards(rewards: Sequence[float], expected: int) -> list[float]:
    """The reward function's answer as floats, refusing a wrong count or non-finite values."""
    values = [float(r) for r in rewards]
    if len(values) != expected:
        raise ValueError(f"reward_fn returned {len(values)} rewards for {expected} completions")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"reward_fn returned non-finite rewards: {bad[:5]}")
    return values


def float_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a log record, as floats (for JSON and the iteration record)."""
    return {
        key: float(value)
        for key, value in entry.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
