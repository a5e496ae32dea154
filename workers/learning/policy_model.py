"""What policy improvement shares below the algorithms: the policy model, its sampling options,
reward and progress callbacks (improve.py drives ppo.py and rl_trl.py, which build on this).

The embedded serving backend uses the same neutral sampling options, so that a suggestion's
logged log-prob and the log-probs policy improvement scores are of one distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.learning.chat import ChatMessage

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

RewardFn = Callable[[Sequence[list[ChatMessage]], Sequence[str]], list[float]]
ProgressFn = Callable[[str, float], None]

POLICY_ADAPTER = "default"  # peft saves the adapter named "default" at the directory's root

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


def end_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a reply: the model's eos ids, then the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]


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
