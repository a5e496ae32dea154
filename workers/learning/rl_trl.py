"""RLOO and GRPO through TRL's trainers, with Q^pi(s, a) as the reward function.

The policy handed to TRL is a PeftModel whose trainable "default" adapter holds the parent's
weights (pi_i). Given such a model, TRL's RLOOTrainer and GRPOTrainer (trl 1.16, peft >= 0.20)
add a frozen copy of it as adapter "ref" and compute the reference log-probs with it, so the KL
is to pi_i exactly, not to the base model (which is what a fresh `peft_config` would give).
`train_trl` checks that TRL did so, and saves only "default": pi_{i+1} is one adapter on the
base, as in our PPO (see improve.py). No approximation is involved.

How beta enters differs between the two, as in TRL: RLOO subtracts beta * sum_t (log pi -
log pi_i) from each reply's reward (k1 estimator); GRPO adds beta * k3 per token to the loss.
Neither has a value head: the other replies to the same prompt are the baseline.

Rollouts come from the serving engine (`rollout_engine="fast"`, the default), as in our PPO:
TRL's `_generate_single_turn` is overridden to submit each prompt to workers/learning/engine.py,
whose "default" arm is synced from the trained adapter whenever TRL's step changed, and after
each sync two fixed probe replies are scored by the engine and by the trainer's model: a
difference above `logprob_tolerance` raises LogprobMismatch (a silent LoRA-sync bug would train
on samples of another policy). TRL then scores the sampled tokens itself, as it does after
generate(); with `rollout_engine="transformers"` TRL samples with generate().
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workers.learning.chat import ChatMessage
from workers.learning.configs import GRPOConfig, RLOOConfig
from workers.learning.policy_model import (
    NEUTRAL_GENERATION,
    POLICY_ADAPTER,
    ProgressFn,
    RewardFn,
    checked_rewards,
    float_metrics,
    load_policy,
    load_tokenizer,
    resolve_device,
    save_policy,
)

log = logging.getLogger(__name__)

TRL_REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of the parent adapter


def train_trl(
    *,
    base_model: Path,
    parent_adapter: Path,
    prompts: Sequence[list[ChatMessage]],
    reward_fn: RewardFn,
    config: RLOOConfig | GRPOConfig,
    output_dir: Path,
    progress: ProgressFn,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Run RLOO or GRPO from pi_i and save pi_{i+1}: (summary metrics, per-step metrics)."""
    from datasets import Dataset  # type: ignore[import-untyped]
    from transformers import PrinterCallback, TrainerCallback, set_seed

    if config.device.startswith("cuda:"):
        raise ValueError("TRL places the model itself: pick the GPU with CUDA_VISIBLE_DEVICES")
    algorithm = "grpo" if isinstance(config, GRPOConfig) else "rloo"
    device = resolve_device(config.device)
    set_seed(config.seed)
    tokenizer = load_tokenizer(base_model)
    model = load_policy(base_model, parent_adapter, device)

    # TRL hands reward functions the dataset's extra columns: the index recovers the exact
    # ChatMessage prompt that Q should see, rather than re-parsing TRL's message dicts.
    dataset = Dataset.from_list(
        [
            {"prompt": [m.as_dict() for m in messages], "state_index": index}
            for index, messages in enumerate(prompts)
        ]
    )
    prompts_by_index = list(prompts)

    def q_reward(
        prompts: list[Any], completions: list[Any], state_index: list[int], **_: Any
    ) -> list[float]:
        """Q^pi of each sampled reply, in TRL's reward-function signature."""
        states = [prompts_by_index[i] for i in state_index]
        replies = [str(completion[-1]["content"]) for completion in completions]
        return checked_rewards(reward_fn(states, replies), len(replies))

    class Progress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress(algorithm, state.global_step / max(state.max_steps, 1))

    with tempfile.TemporaryDirectory(prefix=f"outcomeloop-{algorithm}-") as scratch:
        trainer = _make_trainer(config, scratch, model, tokenizer, q_reward, dataset, device)
        trainer.add_callback(Progress())
        trainer.remove_callback(PrinterCallback)  # it print()s every log; we log and return them
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if config.beta > 0 and TRL_REFERENCE_ADAPTER not in policy.peft_config:
            raise RuntimeError(
                "TRL did not add the frozen copy of the parent adapter: its KL would be to the "
                "base model, not to pi_i (needs peft >= 0.20 and a PeftModel policy)"
            )
        try:
            trainer.train()
        finally:
            if isinstance(trainer, _EngineRollouts):
                trainer.close_engine()
        save_policy(policy, output_dir)

    history = [
        _with_common_names(float_metrics(entry))
        for entry in trainer.state.log_history
        if "reward" in entry
    ]
    if not history:
        raise RuntimeError(f"TRL {algorithm} logged no training step")
    final = float_metrics(trainer.state.log_history[-1])
    summary = {
        **history[-1],
        "q_mean_first": history[0]["q_mean"],
        "seconds": final.get("train_runtime", float("nan")),
    }
    gaps = getattr(trainer, "served_logprob_gaps", None)
    if gaps:
        summary["served_logprob_gap"] = max(gaps)
    return summary, history


class _EngineRollouts:
    """What RLOO and GRPO share to sample from the serving engine (see the module's note).
    Mixed in before the TRL trainer, whose attributes (model, state, accelerator) it reads."""

    engine_config: RLOOConfig | GRPOConfig
    _engine: Any = None
    _engine_step: int = -1
    _probe: list[tuple[list[int], list[int]]]
    served_logprob_gaps: list[float]

    def _engine_generate(self, prompt_ids: list[list[int]]) -> list[list[int]] | None:
        """One reply per prompt from the engine's policy arm (None: sample with generate())."""
        from workers.learning.engine import DecodeParams
        from workers.learning.ppo import check_served_logprobs, peft_engine, sync_policy

        config = self.engine_config
        trainer: Any = self
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if self._engine is None:
            self._engine = peft_engine(
                policy,
                trainer.processing_class,
                max_batch=max(len(prompt_ids), 2),
                adapters=[POLICY_ADAPTER],
            )
            if self._engine is None:
                return None
            self._probe, self.served_logprob_gaps = [], []
        elif trainer.state.global_step != self._engine_step:
            sync_policy(self._engine, policy)
        params = DecodeParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
        )
        futures = [self._engine.submit(ids, POLICY_ADAPTER, params) for ids in prompt_ids]
        replies = [future.result()[0].tokens for future in futures]
        if trainer.state.global_step != self._engine_step:
            if not self._probe:  # fixed from the first rollout on
                self._probe = [
                    (list(p), list(r)) for p, r in zip(prompt_ids, replies, strict=True) if r
                ][:2]
            was_training = policy.training
            policy.eval()
            try:
                gap = check_served_logprobs(
                    self._engine,
                    policy,
                    self._probe,
                    config.temperature,
                    config.logprob_tolerance,
                )
            finally:
                policy.train(was_training)
            self.served_logprob_gaps.append(gap)
            self._engine_step = trainer.state.global_step
        return replies

    def close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def _engine_trainer(base: type, config: RLOOConfig | GRPOConfig) -> type:
    """`base` (TRL's RLOOTrainer or GRPOTrainer) sampling from the serving engine."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    if issubclass(base, GRPOTrainer):

        class EngineGRPOTrainer(_EngineRollouts, base):  # type: ignore[misc]
            engine_config = config

            def _generate_single_turn(  # type: ignore[no-untyped-def]
                self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            ):
                if images is None and not multimodal_fields:
                    replies = self._engine_generate(prompt_ids)
                    if replies is not None:
                        return replies, None  # TRL rescored them, as after generate()
                return super()._generate_single_turn(
                    prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
                )

        return EngineGRPOTrainer

    class EngineRLOOTrainer(_EngineRollouts, base):  # type: ignore[misc]
        engine_config = config

        def _generate_single_turn(  # type: ignore[no-untyped-def]
            self, prompt_ids, images, multimodal_fields
        ):
            if images is None and not multimodal_fields:
                replies = self._engine_generate(prompt_ids)
                if replies is not None:
                    return replies
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields)

    return EngineRLOOTrainer


def _make_trainer(
    config: RLOOConfig | GRPOConfig,
    scratch: str,
    model: Any,
    tokenizer: Any,
    reward: Any,
    dataset: Any,
    device: str,
) -> Any:
    """The TRL trainer for config, with our fields mapped onto its arguments."""
    common: dict[str, Any] = {
        "output_dir": scratch,
        "max_steps": config.num_steps,
        # TRL counts completions per batch: each prompt is repeated num_generations times.
        "per_device_train_batch_size": config.prompts_per_step * config.num_generations,
        "gradient_accumulation_steps": 1,
        "num_generations": config.num_generations,
        "max_completion_length": config.max_new_tokens,
        # TRL samples and scores at this one temperature (its fused LM head divides by it).
        # Every other sampling option is pinned neutral, here and in the model's own
        # generation_config (load_policy), which generate() would otherwise merge in.
        "temperature": config.temperature,
        "top_p": config.top_p,  # 1.0: the config refuses a nucleus TRL would not score
        "top_k": 0,
        "min_p": None,
        "repetition_penalty": 1.0,
        "generation_kwargs": dict(NEUTRAL_GENERATION),
        "beta": config.beta,
        "epsilon": config.epsilon,
        "num_iterations": config.num_iterations,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": "constant",  # as our PPO; TRL's linear decay halves a short run
        "max_grad_norm": config.max_grad_norm,
        "seed": config.seed,
        "data_seed": config.seed,
        "use_cpu": device == "cpu",
        "bf16": False,  # TRL would default to bf16; the policy is trained in float32
        "gradient_checkpointing": config.gradient_checkpointing,
        "disable_dropout": True,  # sampling and scoring must be one distribution
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
    }
    if isinstance(config, GRPOConfig):
        from trl.trainer.grpo_config import GRPOConfig as TRLGRPOConfig
        from trl.trainer.grpo_trainer import GRPOTrainer

        grpo_args = TRLGRPOConfig(
            **common, loss_type=config.loss_type, scale_rewards=config.scale_rewards
        )
        grpo = _engine_trainer(GRPOTrainer, config) if config.rollout_engine == "fast" else None
        return (grpo or GRPOTrainer)(
            model=model,
            reward_funcs=reward,
            args=grpo_args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    from trl.trainer.rloo_config import RLOOConfig as TRLRLOOConfig
    from trl.trainer.rloo_trainer import RLOOTrainer

    rloo_args = TRLRLOOConfig(**common, normalize_advantages=config.normalize_advantages)
    rloo = _engine_trainer(RLOOTrainer, config) if config.rollout_engine == "fast" else None
    return (rloo or RLOOTrainer)(
        model=model,
        reward_funcs=reward,
        args=rloo_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def _with_common_names(entry: dict[str, float]) -> dict[str, float]:
    """TRL's step log plus the names our PPO uses for the same quantities."""
    named = dict(entry)
    if "rewards/q_reward/mean" in entry:
        named["q_mean"] = entry["rewards/q_reward/mean"]
    if "kl" in entry:
        named["kl_ref_per_token"] = entry["kl"]  # mean over reply tokens, as TRL estimates it
    return named
