"""DPO on the business's edits of suggestions, through TRL's DPOTrainer.

Where a business edited a suggestion or wrote its own message instead, what it sent is taken as
preferred to the suggestion in that state: a (prompt, chosen, rejected) triple, the prompt being
the chat prompt the policy was served with. `DPOConfig.relations` picks edits, rejections or
both; `outcome="reached"` keeps only triples from conversations that reached the outcome.

The policy handed to TRL is a PeftModel whose trainable "default" adapter holds pi_i; TRL (1.16,
peft >= 0.20) adds a frozen copy of it as adapter "ref" and takes its log-probs as the
reference, so the implicit KL is to pi_i, not to the base model (checked below, as in
rl_trl.py). Log-probs at temperature 1, TRL's sigmoid loss, LoRA only; only "default" is saved.

TRL cuts a sequence longer than max_length at its end (keep_start), which would cut the reply;
so the oldest turns of a long state are dropped here first (the system prompt stays), until
prompt and the longer reply fit.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workers.learning.chat import prompt_messages
from workers.learning.configs import DPOConfig
from workers.learning.policy_model import (
    ProgressFn,
    float_metrics,
    load_policy,
    load_tokenizer,
    resolve_device,
    save_policy,
)
from workers.learning.preferences import EditPair

log = logging.getLogger(__name__)

TRL_REFERENCE_ADAPTER = "ref"


def selected_edits(edits: Sequence[EditPair], config: DPOConfig) -> list[EditPair]:
    """The triples the config asks for: the relations chosen, and the outcome filter."""
    return [
        e
        for e in edits
        if e.relation in config.relations
        and (config.outcome == "any" or e.outcome == 1)
        and e.chosen.strip() != e.rejected.strip()
    ]


def dpo_rows(tokenizer: Any, edits: Sequence[EditPair], max_length: int) -> list[dict[str, Any]]:
    """TRL's conversational preference rows, each state cut from the oldest turn until the
    prompt and the longer of the two replies fit max_length tokens."""
    rows = []
    for edit in edits:
        state = list(edit.state)
        longest = max(
            len(tokenizer(text, add_special_tokens=False)["input_ids"])
            for text in (edit.chosen, edit.rejected)
        )
        while True:
            messages = [m.as_dict() for m in prompt_messages(edit.system, state)]
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            prompt_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if prompt_tokens + longest + 2 <= max_length or len(state) <= 1:
                break
            state = state[1:]
        rows.append(
            {
                "prompt": messages,
                "chosen": [{"role": "assistant", "content": edit.chosen}],
                "rejected": [{"role": "assistant", "content": edit.rejected}],
            }
        )
    return rows


def train_dpo(
    *,
    base_model: Path,
    parent_adapter: Path,
    edits: Sequence[EditPair],
    config: DPOConfig,
    output_dir: Path,
    progress: ProgressFn,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """DPO from pi_i on the edits; saves pi_{i+1} to output_dir: (summary, per-step metrics)."""
    from datasets import Dataset  # type: ignore[import-untyped]
    from transformers import PrinterCallback, TrainerCallback, set_seed
    from trl.trainer.dpo_config import DPOConfig as TRLDPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    if config.device.startswith("cuda:"):
        raise ValueError("TRL places the model itself: pick the GPU with CUDA_VISIBLE_DEVICES")
    chosen = selected_edits(edits, config)
    if not chosen:
        raise ValueError(
            f"no edits left for DPO: {len(edits)} logged, none with relation in "
            f"{list(config.relations)} and outcome {config.outcome!r}"
        )
    device = resolve_device(config.device)
    set_seed(config.seed)
    tokenizer = load_tokenizer(base_model)
    model = load_policy(base_model, parent_adapter, device)
    dataset = Dataset.from_list(dpo_rows(tokenizer, chosen, config.max_length))

    class Progress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress("dpo", state.global_step / max(state.max_steps, 1))

    with tempfile.TemporaryDirectory(prefix="outcomeloop-dpo-") as scratch:
        args = TRLDPOConfig(
            output_dir=scratch,
            num_train_epochs=config.n_epochs,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=1,
            learning_rate=config.learning_rate,
            lr_scheduler_type="constant",
            max_grad_norm=config.max_grad_norm,
            beta=config.beta,
            max_length=config.max_length,
            # pi_i is frozen: its log-probs once, before training, not in every epoch
            precompute_ref_log_probs=True,
            seed=config.seed,
            data_seed=config.seed,
            use_cpu=device == "cpu",
            bf16=False,
            disable_dropout=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.add_callback(Progress())
        trainer.remove_callback(PrinterCallback)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if TRL_REFERENCE_ADAPTER not in policy.peft_config:
            raise RuntimeError(
                "TRL did not add the frozen copy of the parent adapter: its reference would be "
                "the base model, not pi_i (needs peft >= 0.20 and a PeftModel policy)"
            )
        trainer.train()
        save_policy(policy, output_dir)

    history = [
        _with_common_names(float_metrics(entry))
        for entry in trainer.state.log_history
        if "rewards/margins" in entry
    ]
    if not history:
        raise RuntimeError("TRL DPO logged no training step")
    final = float_metrics(trainer.state.log_history[-1])
    summary = {
        **history[-1],
        "pairs": float(len(chosen)),
        "loss_first": history[0]["loss"],
        "seconds": final.get("train_runtime", float("nan")),
    }
    log.info("dpo: %d pairs, %d steps, last loss %.4f", len(chosen), len(history), summary["loss"])
    return summary, history


def _with_common_names(entry: dict[str, float]) -> dict[str, float]:
    """TRL's step log plus the names DMPO uses for the same quantities."""
    named = dict(entry)
    for ours, theirs in (
        ("reward_margin", "rewards/margins"),
        ("reward_accuracy", "rewards/accuracies"),
        ("chosen_reward", "rewards/chosen"),
        ("rejected_reward", "rewards/rejected"),
    ):
        if theirs in entry:
            named[ours] = entry[theirs]
    return named
