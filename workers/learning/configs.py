"""One config dataclass per learning step; each is stored with the iteration that used it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

# --- Q fit ---

QKind = Literal["finetune", "head", "lexical"]
QPooling = Literal["last", "mean", "last_mean", "state_reply"]
QDtype = Literal["float32", "bfloat16", "float16"]
Q_KINDS: tuple[QKind, ...] = get_args(QKind)
Q_POOLINGS: tuple[QPooling, ...] = get_args(QPooling)
Q_DTYPES: tuple[QDtype, ...] = get_args(QDtype)


@dataclass(frozen=True)
class QFitConfig:
    """How Q^pi(s, a) is regressed on Monte Carlo returns (workers/learning/q_model.py)."""

    # 'lexical' is the default by evidence (tests/benchmarks/pfg_q_eval.py, README "Which Q"):
    # fitted on all of PersuasionForGood's train split, its dev AUC is 0.672 / 0.702 (first
    # half / all turns) against 0.618 / 0.646 for TF-IDF logistic regression in the same run
    # (+0.02 on average over 5 folds of train + dev), in about a minute on 2 cores. The head,
    # at 600 decisions, was below TF-IDF (0.577 / 0.635 against 0.674 / 0.692) and costs ~1 s
    # of backbone per decision here; on simulated chats the lexical Q's reply contrasts follow
    # the simulator's score at 0.70, the head's at 0.27 (tests/benchmarks/sim_q_rank.py).
    kind: QKind = field(
        default="lexical",
        metadata={
            "help": "'finetune': LoRA + score head on the base model, trained end to end (the "
            "paper's reward model). 'head': a small head on frozen backbone features (fast on "
            "CPU). 'lexical': a ridge on TF-IDF blocks of the state's and the reply's words, no "
            "language model (seconds)."
        },
    )
    base_model: str = field(
        default="",
        metadata={"help": "Path of the local Hugging Face checkpoint the policy adapts."},
    )
    max_length: int = field(
        default=256,
        metadata={
            "help": "Tokens per (state, reply) text; the state is cut from the left so that the "
            "latest turns and the candidate reply are kept."
        },
    )
    max_reply_length: int = field(
        default=64,
        metadata={
            "help": "Tokens of the reply kept (its start; at most half of max_length); the "
            "state keeps its last max_length minus that many tokens whatever the reply, so "
            "replies to one state are scored in one context and V's state features cannot see "
            "the reply. 0: the whole text is cut from the left (models saved before this)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (finetune)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (finetune)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (finetune)."})
    lora_target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        metadata={
            "help": "Linear layers that get LoRA (finetune); the score head is trained fully."
        },
    )
    learning_rate: float = field(
        default=1e-4, metadata={"help": "AdamW learning rate of LoRA and score head (finetune)."}
    )
    epochs: int = field(default=1, metadata={"help": "Passes over the training set (finetune)."})
    batch_size: int = field(
        default=8,
        metadata={"help": "Rows per forward pass through the backbone (training and features)."},
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Batches per optimiser step (finetune)."}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay of LoRA and score head (finetune)."}
    )
    # 'mean' stays the default: on PersuasionForGood (600 train decisions, all 1094 dev ones,
    # max_length 192, reply budget 64, linear heads) 'state_reply' did not rank replies better:
    # held-out corr(Q - V, G - V) 0.125 [0.049, 0.195] for 'mean', 0.056 [-0.015, 0.137] for
    # 'state_reply' (tests/benchmarks/pfg_q_eval.py; 95% intervals over dev dialogues).
    head_pooling: QPooling = field(
        default="mean",
        metadata={
            "help": "Backbone features for the head: the mean hidden state over all the tokens "
            "('mean'), the last token's ('last'), both concatenated ('last_mean'), or the mean "
            "over the state's tokens beside the mean over the reply's ('state_reply': the reply "
            "is not diluted by a long state)."
        },
    )
    head_depth: float = field(
        default=0.5,
        metadata={
            "help": "Share of the backbone's decoder layers run for the head's features (1.0 = "
            "all); middle layers of a frozen LM are better features, and cheaper."
        },
    )
    head_hidden: int = field(
        default=0,
        metadata={
            "help": "Hidden units of the head's one MLP layer, trained by Adam; 0 = a linear "
            "head, fitted in closed form (weighted ridge)."
        },
    )
    head_alphas: tuple[float, ...] = field(
        default=(1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5),
        metadata={
            "help": "Ridge penalties tried for the linear head and for the state value V: the "
            "one of least cross-validated error (folds grouped by conversation) is used. In "
            "units of sum_i w_i (G_i - Q_i)^2 + alpha |coefficients|^2 on standardised features, "
            "importance weights w scaled to mean 1; one value = no cross-validation."
        },
    )
    head_cv_folds: int = field(
        default=5,
        metadata={
            "help": "Cross-validation folds for the ridge penalty (at most one per training "
            "conversation), >= 2."
        },
    )
    head_learning_rate: float = field(
        default=1e-3, metadata={"help": "Adam learning rate of the MLP head (head_hidden > 0)."}
    )
    head_epochs: int = field(
        default=30, metadata={"help": "Passes over the cached features (MLP head)."}
    )
    head_batch_size: int = field(
        default=256, metadata={"help": "Rows per optimiser step (MLP head)."}
    )
    head_l2: float = field(
        default=1.0,
        metadata={
            "help": "L2 penalty on the MLP head's weights added to the weighted mean squared "
            "error; frozen features of a few hundred conversations overfit without it."
        },
    )
    lexical_max_ngram: int = field(
        default=2, metadata={"help": "Longest word n-gram of the lexical kind's TF-IDF blocks."}
    )
    lexical_min_df: int = field(
        default=2,
        metadata={
            "help": "An n-gram enters a lexical block's vocabulary in at least this many "
            "training decisions."
        },
    )
    lexical_alphas: tuple[float, ...] = field(
        default=(0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3),
        metadata={
            "help": "Ridge penalties tried for the lexical kind's Q and V (grouped cross-"
            "validation as head_alphas); its blocks are l2-normalised TF-IDF rows, not "
            "standardised features, hence a grid of its own."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seeds subsampling, splits and training."})
    device: str = field(
        default="auto", metadata={"help": "'auto' (CUDA when present, else CPU), 'cpu', 'cuda'."}
    )
    dtype: QDtype = field(
        default="float32",
        metadata={"help": f"Backbone dtype, one of {Q_DTYPES}; heads and LoRA stay float32."},
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of conversations held out for evaluation when no eval set is "
            "given (0 = no held-out metrics)."
        },
    )
    max_examples: int = field(
        default=0,
        metadata={
            "help": "Cap on training examples (0 = all); subsampled by seed, the same share "
            "from every conversation."
        },
    )
    eval_bootstrap: int = field(
        default=1000,
        metadata={
            "help": "Resamples of the held-out conversations (with replacement) for the 95% "
            "intervals of the held-out metrics; 0 = no intervals (and then the iteration's "
            "gate, on the ranking measure's lower bound, cannot pass)."
        },
    )

    def __post_init__(self) -> None:
        if self.kind not in Q_KINDS:
            raise ValueError(f"kind must be one of {Q_KINDS}, not {self.kind!r}")
        if self.head_pooling not in Q_POOLINGS:
            raise ValueError(f"head_pooling must be one of {Q_POOLINGS}, not {self.head_pooling!r}")
        if self.dtype not in Q_DTYPES:
            raise ValueError(f"dtype must be one of {Q_DTYPES}, not {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', not {self.device!r}")
        if self.max_length < 16:
            raise ValueError(f"max_length must be at least 16 tokens, not {self.max_length}")
        positive = {
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "head_epochs": self.head_epochs,
            "head_batch_size": self.head_batch_size,
            "learning_rate": self.learning_rate,
            "head_learning_rate": self.head_learning_rate,
            "lexical_max_ngram": self.lexical_max_ngram,
            "lexical_min_df": self.lexical_min_df,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        non_negative = {
            "head_hidden": self.head_hidden,
            "weight_decay": self.weight_decay,
            "head_l2": self.head_l2,
            "max_examples": self.max_examples,
            "eval_bootstrap": self.eval_bootstrap,
            "max_reply_length": self.max_reply_length,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must not be negative, not {value}")
        if not 0.0 < self.head_depth <= 1.0:
            raise ValueError(f"head_depth must be in (0, 1], not {self.head_depth}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), not {self.eval_fraction}")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module")
        if not self.head_alphas or any(not a > 0 for a in self.head_alphas):
            raise ValueError(f"head_alphas must be positive penalties, not {self.head_alphas}")
        if not self.lexical_alphas or any(not a > 0 for a in self.lexical_alphas):
            raise ValueError(
                f"lexical_alphas must be positive penalties, not {self.lexical_alphas}"
            )
        if self.head_cv_folds < 2:
            raise ValueError(f"head_cv_folds must be at least 2, not {self.head_cv_folds}")

    @property
    def reply_budget(self) -> int:
        """Tokens the reply may take (0: the whole text is cut from the left)."""
        return min(self.max_reply_length, self.max_length // 2)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora_target_modules"] = list(self.lora_target_modules)
        data["head_alphas"] = list(self.head_alphas)
        data["lexical_alphas"] = list(self.lexical_alphas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QFitConfig:
        """The inverse of as_dict; unknown keys are an error (a manifest from another version)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QFitConfig fields: {unknown}")
        values = dict(data)
        for name in ("lora_target_modules", "head_alphas", "lexical_alphas"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


# --- Policy improvement ---

GRPO_LOSS_TYPES: tuple[str, ...] = ("dapo", "grpo", "dr_grpo", "bnpo")
GRPO_REWARD_SCALINGS: tuple[str, ...] = ("group", "batch", "none")


@dataclass(frozen=True)
class _PolicyImprovementConfig:
    """What every policy-improvement algorithm shares: sampling, the KL to pi_i, the optimiser."""

    learning_rate: float = field(
        default=5e-5, metadata={"help": "AdamW learning rate of the policy's LoRA weights."}
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "Longest sampled reply, in tokens (a cut reply is scored)."}
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of the rollouts; log-probabilities use the same one. "
            "1.0 samples the policy itself, which is what the KL and the ratios assume."
        },
    )
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "Nucleus sampling mass of the rollouts (1.0 = off); as served, so that the "
            "policy improved is the one that acts. PPO scores log-probs over the same nucleus; "
            "RLOO and GRPO (TRL) cannot and refuse top_p < 1."
        },
    )
    beta: float = field(
        default=0.05,
        metadata={
            "help": "KL coefficient toward pi_i, the parent policy (base + parent adapter, "
            "frozen); 0 disables the penalty."
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Global gradient-norm clip of each optimiser step."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds prompt order, sampling and init."})
    device: str = field(
        default="auto", metadata={"help": "'auto' (CUDA when present, else CPU), 'cpu', 'cuda'."}
    )

    rollout_engine: str = field(
        default="fast",
        metadata={
            "help": "'fast': rollouts from the serving engine (workers/learning/engine.py), with "
            "the policy's adapter synced after every update and its log-probs checked against "
            "the trainer's on a probe set; 'transformers': generate() (PPO adds a scoring pass)."
        },
    )
    logprob_tolerance: float = field(
        default=0.05,
        metadata={
            "help": "Largest difference of a probe reply's summed log-prob, served engine vs "
            "trainer, before training stops with an error (a silent LoRA-sync bug shows here)."
        },
    )

    def __post_init__(self) -> None:
        if self.rollout_engine not in ("fast", "transformers"):
            raise ValueError(
                f"rollout_engine must be 'fast' or 'transformers', not {self.rollout_engine!r}"
            )
        if self.logprob_tolerance <= 0:
            raise ValueError(f"logprob_tolerance must be positive, not {self.logprob_tolerance}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', not {self.device!r}")
        for name in ("learning_rate", "max_new_tokens", "temperature", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.beta < 0:
            raise ValueError(f"beta must not be negative, not {self.beta}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; `type(config)(**data)` is the inverse (unknown keys are a TypeError)."""
        return asdict(self)


@dataclass(frozen=True)
class PPOConfig(_PolicyImprovementConfig):
    """Our token-level PPO with a value head and GAE (workers/learning/ppo.py)."""

    num_updates: int = field(
        default=16, metadata={"help": "Rollout-then-optimise rounds; each samples batch_size."}
    )
    batch_size: int = field(
        default=16, metadata={"help": "Prompts per rollout, one sampled reply each."}
    )
    minibatch_size: int = field(default=4, metadata={"help": "Rollout rows per optimiser step."})
    n_ppo_epochs: int = field(
        default=4, metadata={"help": "Passes over each rollout before sampling the next one."}
    )
    batch_by_conversation: bool = field(
        default=False,
        metadata={
            "help": "Fill each rollout with whole conversations' states (prompts opening with "
            "the same two messages) rather than states drawn anywhere: their shared history is "
            "computed once, by the trainer's packed minibatches and the engine's prefix cache "
            "(on the demo's states 103 instead of 137 tokens a row at minibatch 4), but an "
            "update sees fewer conversations. Its effect on learning is not measured yet."
        },
    )
    tree_attention: bool = field(
        default=True,
        metadata={
            "help": "The packed minibatches' attention computes only the blocks their prefix "
            "tree lets a token see (workers/learning/tree_attention.py; equal to the dense "
            "masked attention); false: the dense (N, N) masked attention."
        },
    )
    gamma_tok: float = field(
        default=1.0, metadata={"help": "Per-token discount inside one reply (GAE gamma)."}
    )
    lam: float = field(
        default=1.0,
        metadata={
            "help": "GAE lambda. 1.0 for the single terminal reward Q: every token's advantage "
            "is then the whole return minus its value, whereas lambda < 1 with the value head "
            "starting at zero gives the first of 64 tokens lambda^63 of Q (0.95^63 = 0.04)."
        },
    )
    cliprange: float = field(
        default=0.2, metadata={"help": "Clip of the probability ratio in the surrogate."}
    )
    cliprange_value: float = field(
        default=0.2, metadata={"help": "Clip of the value update around the rollout's values."}
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    value_learning_rate: float = field(
        default=1e-3,
        metadata={
            "help": "AdamW learning rate of the linear value head, which starts from zero each "
            "improvement and must catch up with the returns quickly."
        },
    )
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Normalise advantages over each rollout's tokens."}
    )
    whiten_scores: bool = field(
        default=False,
        metadata={"help": "Normalise the Q rewards of each rollout to mean 0, std 1."},
    )
    score_clip: float | None = field(
        default=None,
        metadata={"help": "Clip Q rewards (after whitening) to [-score_clip, score_clip]."},
    )
    target_kl: float | None = field(
        default=None,
        metadata={
            "help": "Stop a rollout's epochs early once the approximate KL between the rollout "
            "policy and the updated one exceeds this (None = never)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "num_updates",
            "batch_size",
            "minibatch_size",
            "n_ppo_epochs",
            "cliprange",
            "cliprange_value",
            "value_learning_rate",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.minibatch_size > self.batch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) exceeds batch_size ({self.batch_size})"
            )
        for name in ("gamma_tok", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if self.vf_coef < 0:
            raise ValueError(f"vf_coef must not be negative, not {self.vf_coef}")
        if self.score_clip is not None and self.score_clip <= 0:
            raise ValueError(f"score_clip must be positive or None, not {self.score_clip}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be positive or None, not {self.target_kl}")


@dataclass(frozen=True)
class _GroupSamplingConfig(_PolicyImprovementConfig):
    """RLOO and GRPO through TRL: several replies per prompt, the group is the baseline."""

    num_steps: int = field(default=16, metadata={"help": "Optimiser steps (TRL max_steps)."})
    prompts_per_step: int = field(
        default=4, metadata={"help": "Distinct prompts per optimiser step."}
    )
    num_generations: int = field(
        default=4, metadata={"help": "Replies sampled per prompt (at least 2)."}
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "Clip of the probability ratio in the surrogate."}
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Optimiser steps per sampled batch (mu in GRPO)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for memory (large models on a GPU)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_steps", "prompts_per_step", "num_iterations", "epsilon"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be at least 2, not {self.num_generations}")
        if self.top_p < 1.0:
            # TRL samples with top_p but computes every log-prob (ratios, KL) as
            # log_softmax(logits / T) over the whole vocabulary (trl 1.16 add_fused_lm_head).
            raise ValueError(
                f"top_p={self.top_p}: TRL scores log-probs at temperature only, not over the "
                "top_p nucleus it samples from; serve with top_p=1.0 or use ppo"
            )


@dataclass(frozen=True)
class RLOOConfig(_GroupSamplingConfig):
    """REINFORCE leave-one-out via trl.RLOOTrainer (workers/learning/rl_trl.py).

    beta enters as a sequence-level penalty on the reward, as in TRL's RLOO.
    """

    normalize_advantages: bool = field(
        default=False, metadata={"help": "Normalise advantages over each sampled batch."}
    )


@dataclass(frozen=True)
class GRPOConfig(_GroupSamplingConfig):
    """GRPO via trl.GRPOTrainer (workers/learning/rl_trl.py).

    beta weights a per-token KL term (k3 estimator) in the loss, as in TRL's GRPO.
    """

    loss_type: str = field(
        default="dapo",
        metadata={"help": f"TRL's token aggregation of the loss, one of {GRPO_LOSS_TYPES}."},
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": f"Reward scaling before the advantage, one of {GRPO_REWARD_SCALINGS}."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, not {self.loss_type!r}")
        if self.scale_rewards not in GRPO_REWARD_SCALINGS:
            raise ValueError(
                f"scale_rewards must be one of {GRPO_REWARD_SCALINGS}, not {self.scale_rewards!r}"
            )


# --- Offline improvement from preferences (DMPO on conversation pairs, DPO on business edits) ---

EDIT_RELATIONS: tuple[str, ...] = ("edited", "rejected")
EDIT_OUTCOMES: tuple[str, ...] = ("any", "reached")


@dataclass(frozen=True)
class _PreferenceConfig:
    """What DMPO and DPO share: a LoRA step from pi_i on logged preferences, no sampling.

    Log-probabilities are the model's own (temperature 1), as in DPO: the logged texts were
    written by people, and a nucleus would give some of their tokens probability zero.
    Hyperparameters are named as in fine-tuning job APIs (n_epochs, beta, batch_size,
    learning_rate).
    """

    n_epochs: int = field(default=2, metadata={"help": "Passes over the preference data."})
    batch_size: int = field(default=4, metadata={"help": "Preference pairs per optimiser step."})
    learning_rate: float = field(
        default=5e-5, metadata={"help": "AdamW learning rate of the policy's LoRA weights."}
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "Strength of the implicit KL to pi_i (the parent policy, frozen): larger "
            "stays closer; the convention is 0.01 to 0.5."
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Global gradient-norm clip of each optimiser step."}
    )
    max_action_tokens: int = field(
        default=128,
        metadata={
            "help": "Tokens of each business turn scored (its start): a longer turn is cut, "
            "the same way under the policy and under pi_i."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seeds the order of the pairs and init."})
    device: str = field(
        default="auto", metadata={"help": "'auto' (CUDA when present, else CPU), 'cpu', 'cuda'."}
    )

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', not {self.device!r}")
        for name in ("n_epochs", "batch_size", "learning_rate", "max_grad_norm", "beta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.max_action_tokens < 1:
            raise ValueError(f"max_action_tokens must be at least 1, not {self.max_action_tokens}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DMPOConfig(_PreferenceConfig):
    """DMPO (Shi et al. 2024) on pairs of logged conversations (workers/learning/dmpo.py)."""

    gamma: float = field(
        default=0.9,
        metadata={
            "help": "Discount of the turn weights phi(t, T) = gamma^t (1 - gamma^(T-t)) / "
            "(1 - gamma^T): lower makes a trajectory's early turns dominate; 1 gives (T-t)/T."
        },
    )
    opening_similarity: float = field(
        default=0.3,
        metadata={
            "help": "Two conversations of one business whose customers opened differently are "
            "paired only if the openings' word similarity (workers/learning/lexical.py) is at "
            "least this, in [0, 1]; conversations that share their opening always qualify."
        },
    )
    max_pairs_per_conversation: int = field(
        default=2,
        metadata={
            "help": "How many pairs one conversation may appear in (outcomes are rare: a "
            "winner paired with several losers yields more pairs, and more weight)."
        },
    )
    max_turns: int = field(
        default=16,
        metadata={"help": "Business turns of a trajectory scored (its first ones)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], not {self.gamma}")
        if not 0.0 <= self.opening_similarity <= 1.0:
            raise ValueError(f"opening_similarity must be in [0, 1], not {self.opening_similarity}")
        for name in ("max_pairs_per_conversation", "max_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True)
class DPOConfig(_PreferenceConfig):
    """DPO on business edits via trl.DPOTrainer (workers/learning/dpo.py): where a business
    edited or replaced a suggestion, what it sent is preferred to the suggestion."""

    relations: tuple[str, ...] = field(
        default=EDIT_RELATIONS,
        metadata={
            "help": f"Which answers to a suggestion make a pair, of {EDIT_RELATIONS}: 'edited' "
            "(similar enough to count as an edit) and 'rejected' (the business wrote its own)."
        },
    )
    outcome: str = field(
        default="any",
        metadata={
            "help": f"One of {EDIT_OUTCOMES}: 'reached' keeps only pairs from conversations that "
            "reached the outcome (the business's own text is then known to have worked)."
        },
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Tokens of prompt and reply together (TRL's max_length)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.relations or set(self.relations) - set(EDIT_RELATIONS):
            raise ValueError(f"relations must be a non-empty subset of {EDIT_RELATIONS}")
        if self.outcome not in EDIT_OUTCOMES:
            raise ValueError(f"outcome must be one of {EDIT_OUTCOMES}, not {self.outcome!r}")
        if self.max_length < 16:
            raise ValueError(f"max_length must be at least 16, not {self.max_length}")
