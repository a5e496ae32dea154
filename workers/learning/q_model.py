"""Q^pi(s, a): regression of Monte Carlo returns on (conversation state, candidate reply).

As in Jiang et al. (2025), Q is fitted like a single-turn reward model: the input is the chat
the policy sees plus the candidate reply as the final assistant message, the target is the
return G observed after that decision. Three kinds:

- `finetune`: the base model as a sequence regressor (one output, LoRA + a fully trained score
  head), trained end to end with the transformers Trainer. The paper's choice; PPO's reward.
- `head`: a frozen backbone whose pooled hidden states are computed once, and a small head
  on them: linear (weighted ridge in closed form, its penalty chosen by cross-validation
  grouped by conversation) or one hidden layer (Adam). Minutes on a CPU instead of hours.
- `lexical`: no language model; a weighted ridge on TF-IDF blocks of the state's and the
  reply's words (workers/learning/lexical.py). Seconds on a CPU.

Beside Q, fit_q fits a state-only value V(s) (ridge on the backbone's mean hidden state over the
state, without the reply; for `lexical`, a ridge on its state blocks) for the held-out ranking
measure: does Q(s, a) - V(s), the part PPO uses, predict G - V(s)? See
workers/learning/held_out.py.

A fitted model lives in one directory: `q_model.json` (kind, config, metrics, the fit's chosen
penalties, base model path) and the adapter (`adapter/`), the head weights
(`head.safetensors`) or the lexical model (`lexical.json`, `lexical.safetensors`).
`QModel.load` reloads it, `QModel.score` is the batched reward function, `evaluate` the
held-out report.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from workers.learning.chat import ChatMessage, Turn, chat_turns
from workers.learning.configs import Q_POOLINGS, QFitConfig
from workers.learning.examples import StepExample
from workers.learning.held_out import QMetrics, held_out_metrics
from workers.learning.lexical import LexicalLinear, fit_lexical, load_lexical, save_lexical
from workers.learning.ridge import fit_ridge, normalised_weights

log = logging.getLogger(__name__)

MANIFEST = "q_model.json"
ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"
FORMAT_VERSION = 1

ScoreItem = tuple[str | None, Sequence[Turn], str]  # (system, state, candidate reply)
Progress = Callable[[str, float], None]


STATE = "state"  # the mean hidden state over the state's tokens: V's features


class QInput(NamedTuple):
    """A rendered (system, state, reply): token ids, and where the reply starts in them."""

    ids: list[int]
    reply_start: int  # index of the reply's first token (0 when the left cut reached the reply)


@dataclass(frozen=True)
class QFitResult:
    path: Path
    model: QModel
    metrics: QMetrics  # empty when nothing was held out
    fit: dict[str, float | None]  # the chosen ridge penalties: head_alpha, v_alpha
    # V(s): on the state features (STATE pooling of the frozen backbone), or for the lexical
    # kind on its state blocks
    value: QHead | LexicalLinear
    n_train: int
    n_eval: int
    seconds: float


# -- inputs ---------------------------------------------------------------------------------


def q_messages(system: str | None, state: Sequence[Turn], action: str) -> list[ChatMessage]:
    """What the policy saw, then the candidate reply as the final assistant message."""
    head = [ChatMessage("system", system)] if system else []
    # The reply stays its own message even after a business turn: it is what the policy wrote.
    return [*head, *chat_turns(state), ChatMessage("assistant", action)]


def render_q_inputs(
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[ScoreItem],
    max_length: int,
    max_reply_length: int = 0,
) -> list[QInput]:
    """Token ids of each (system, state, reply) in the chat template, and where the reply
    starts in them. The reply span runs from the reply's first token to the end (its closing
    template tokens included).

    With max_reply_length, the reply keeps its first max_reply_length tokens and the state (all
    before the reply) its last max_length - max_reply_length: the state's tokens are then the
    same whatever the reply, so replies to one state are compared in one context, and the
    state's hidden states (V's features) cannot tell anything about the reply. With 0 (models
    saved before this option), the whole text is cut from the left to max_length, so that a
    longer reply leaves less of the state.
    """
    texts, reply_chars = [], []
    for system, state, action in items:
        messages = [m.as_dict() for m in q_messages(system, state, action)]
        text = str(tokenizer.apply_chat_template(messages, tokenize=False))
        texts.append(text)
        reply_chars.append(_reply_char_start(tokenizer, messages, text, action))
    # The template already spells out its special tokens.
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    inputs = []
    for ids, offsets, reply_char in zip(
        encoded["input_ids"], encoded["offset_mapping"], reply_chars, strict=True
    ):
        # The first token that reaches into the reply (a token spanning the boundary counts).
        start = next((i for i, (_, end) in enumerate(offsets) if end > reply_char), len(ids))
        if max_reply_length:
            state = list(ids[max(0, start - (max_length - max_reply_length)) : start])
            inputs.append(QInput(state + list(ids[start : start + max_reply_length]), len(state)))
        else:
            cut = max(0, len(ids) - max_length)
            inputs.append(QInput(list(ids[cut:]), max(0, start - cut)))
    return inputs


def _reply_char_start(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str, action: str
) -> int:
    """Where the final assistant message's content starts in the rendered text."""
    if len(messages) > 1:
        prompt = str(
            tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        )
        if text.startswith(prompt):
            return len(prompt)
    # No prompt, or a template that adds a default system prompt: find the reply itself.
    if not action.strip():
        return len(text)  # nothing to find: an empty reply span
    found = text.rfind(action.strip())
    if found < 0:
        raise ValueError(
            "the chat template does not render the reply verbatim; its span cannot be found"
        )
    return found


def load_tokenizer(base_model: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pad_right(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def _length_batches(inputs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length: far less padding to run through the model."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# -- subsets --------------------------------------------------------------------------------


def split_by_conversation(
    examples: Sequence[StepExample], fraction: float, seed: int
) -> tuple[list[StepExample], list[StepExample]]:
    """(train, held out): a seeded share of whole conversations is held out."""
    ids = sorted({e.conversation_id for e in examples})
    n_held = round(fraction * len(ids))
    if fraction > 0 and len(ids) > 1:
        n_held = min(max(n_held, 1), len(ids) - 1)
    held = {ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:n_held]}
    train = [e for e in examples if e.conversation_id not in held]
    return train, [e for e in examples if e.conversation_id in held]


def subsample_examples(
    examples: Sequence[StepExample], max_examples: int, seed: int
) -> list[StepExample]:
    """At most max_examples, the same share of every conversation, chosen by seed (order kept).

    Each conversation's examples are shuffled and spread over [0, 1) from a random offset
    (systematic sampling); keeping the lowest positions takes round(share * size) from each.
    """
    if max_examples == 0 or len(examples) <= max_examples:
        return list(examples)
    rng = np.random.default_rng(seed)
    by_conversation: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_conversation.setdefault(example.conversation_id, []).append(index)
    position = np.empty(len(examples))
    for conversation_id in sorted(by_conversation):
        members = by_conversation[conversation_id]
        offset = rng.random()
        for rank, member in enumerate(rng.permutation(members)):
            position[member] = (rank + offset) / len(members)
    keep = np.sort(np.argsort(position, kind="stable")[:max_examples])
    return [examples[int(i)] for i in keep]


# -- metrics --------------------------------------------------------------------------------


def evaluate(
    q: QModel,
    examples: Sequence[StepExample],
    *,
    value: QHead | LexicalLinear | None = None,
    batch_size: int = 16,
    n_boot: int = 0,
    seed: int = 0,
) -> QMetrics:
    """Score the examples with q and report held_out_metrics; with value (fit_q's V) also the
    ranking measure. A lexical V reads the text and goes with any Q; a head V reads the state
    features of q's frozen backbone, so it goes with a head Q."""
    items = [(e.system, e.state, e.action) for e in examples]
    v_values = None
    if value is None or isinstance(value, LexicalLinear):
        q_values = q.score(items, batch_size=batch_size)
        v_values = value.predict(items) if value is not None else None
    else:
        if q.head is None:
            raise ValueError("V reads a frozen backbone's features: evaluate it beside a head Q")
        pooling = q.config.head_pooling
        tokenizer, network = q.language_model
        features = pooled_features(
            network,
            render_q_inputs(tokenizer, items, q.config.max_length, q.config.reply_budget),
            poolings=[pooling, STATE],
            batch_size=batch_size,
            pad_id=int(tokenizer.pad_token_id),
        )
        q_values, v_values = _apply(q.head, features[pooling]), _apply(value, features[STATE])
    return held_out_metrics(q_values, examples, v_values=v_values, n_boot=n_boot, seed=seed)


# -- the head kind --------------------------------------------------------------------------


class QHead(nn.Module):
    """Standardised features -> linear or one-hidden-layer MLP -> Q."""

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        # LLM hidden states have a few huge dimensions; standardising keeps one learning
        # rate right for all of them.
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.body: nn.Module = nn.Identity()
        if hidden:
            self.body = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU())
        self.out = nn.Linear(hidden or n_features, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        standardised = (features.float() - self.feature_mean) / self.feature_std
        q: torch.Tensor = self.out(self.body(standardised)).squeeze(-1)
        return q


def pooled_features(
    backbone: nn.Module,
    inputs: Sequence[QInput],
    *,
    poolings: Sequence[str],
    batch_size: int,
    pad_id: int,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Feature rows of each input, by pooling (one forward pass serves them all).

    'mean': the token mean of the hidden states; 'last': the last token's; 'last_mean': both;
    'state_reply': the mean over the state's tokens beside the mean over the reply's;
    STATE: the mean over the state's tokens alone (V's features). Under causal attention the
    state's hidden states do not depend on the reply, so STATE is what the state alone gives.
    An empty span (e.g. no state left by max_length) pools to zeros.
    """
    unknown = sorted(set(poolings) - {*Q_POOLINGS, STATE})
    if unknown:
        raise ValueError(f"unknown poolings {unknown}")
    device = next(backbone.parameters()).device
    rows: dict[str, list[torch.Tensor | None]] = {p: [None] * len(inputs) for p in poolings}
    batches = _length_batches([x.ids for x in inputs], batch_size)
    with torch.inference_mode():
        for done, batch in enumerate(batches, start=1):
            input_ids, attention_mask = (
                t.to(device) for t in _pad_right([inputs[i].ids for i in batch], pad_id)
            )
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask)
            hidden = hidden.last_hidden_state.float()
            position = torch.arange(hidden.shape[1], device=device)[None, :]
            starts = torch.tensor([inputs[i].reply_start for i in batch], device=device)
            valid = attention_mask.bool()
            span_means = {
                "all": _masked_mean(hidden, valid),
                "state": _masked_mean(hidden, valid & (position < starts[:, None])),
                "reply": _masked_mean(hidden, valid & (position >= starts[:, None])),
            }
            last = hidden[torch.arange(len(batch), device=device), attention_mask.sum(1) - 1]
            parts = {
                "mean": span_means["all"],
                "last": last,
                "last_mean": torch.cat([last, span_means["all"]], -1),
                "state_reply": torch.cat([span_means["state"], span_means["reply"]], -1),
                STATE: span_means["state"],
            }
            for pooling in poolings:
                for row, index in zip(parts[pooling].cpu(), batch, strict=True):
                    rows[pooling][index] = row
            if progress is not None:
                progress("features", done / len(batches))
    return {p: torch.stack([row for row in rows[p] if row is not None]) for p in poolings}


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _standardiser(features: torch.Tensor, hidden: int) -> QHead:
    """A head whose buffers standardise these features (its layers still untrained)."""
    head = QHead(features.shape[1], hidden)
    head.feature_mean.copy_(features.mean(0))
    head.feature_std.copy_(features.std(0).clamp_min(1e-6))
    return head


def fit_ridge_head(
    features: torch.Tensor,
    targets: Sequence[float],
    weights: Sequence[float],
    groups: Sequence[str],
    config: QFitConfig,
) -> tuple[QHead, float]:
    """The linear head in closed form: weighted ridge on the standardised features, alpha from
    config.head_alphas by cross-validation grouped by conversation; returns (head, alpha)."""
    head = _standardiser(features, hidden=0)
    standardised = (features.double() - head.feature_mean.double()) / head.feature_std.double()
    fit = fit_ridge(
        standardised.numpy(),
        np.asarray(targets, dtype=np.float64),
        normalised_weights(weights),
        groups,
        config.head_alphas,
        config.head_cv_folds,
    )
    with torch.no_grad():
        head.out.weight.copy_(torch.from_numpy(fit.coef)[None, :])
        head.out.bias.fill_(fit.intercept)
    log.info("ridge head: alpha %g (grouped CV MSE by alpha: %s)", fit.alpha, fit.cv_mse)
    head.eval()
    return head, fit.alpha


def _apply(head: QHead, features: torch.Tensor) -> list[float]:
    with torch.inference_mode():
        return [float(v) for v in head(features.to(head.feature_mean.device)).cpu()]


def train_head(
    features: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    config: QFitConfig,
    progress: Progress | None = None,
) -> QHead:
    """Regression of the targets on cached features by Adam on shuffled minibatches: weighted
    MSE plus head_l2 times the squared weights. The MLP head's trainer; the linear head has a
    closed form (fit_ridge_head)."""
    torch.manual_seed(config.seed)
    head = _standardiser(features, config.head_hidden)
    with torch.no_grad():
        # Start at the mean return: the head then only learns how examples differ from it.
        head.out.bias.fill_(float((weights * targets).sum() / weights.sum()))
    optimizer = torch.optim.Adam(head.parameters(), lr=config.head_learning_rate)
    matrices = [p for p in head.parameters() if p.ndim > 1]
    generator = torch.Generator().manual_seed(config.seed)
    head.train()
    for epoch in range(config.head_epochs):
        for batch in torch.randperm(len(features), generator=generator).split(
            config.head_batch_size
        ):
            penalty = sum((m.square().sum() for m in matrices), torch.zeros(()))
            loss = weighted_mse(head(features[batch]), targets[batch], weights[batch])
            loss = loss + config.head_l2 * penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if progress is not None:
            progress("train", (epoch + 1) / config.head_epochs)
    head.eval()
    return head


def weighted_mse(q: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights * (q - targets) ** 2).sum() / weights.sum()


# -- the finetune kind ----------------------------------------------------------------------


class _RegressionRows(torch.utils.data.Dataset[dict[str, Any]]):
    def __init__(self, inputs: list[list[int]], targets: list[float], weights: list[float]):
        self.inputs, self.targets, self.weights = inputs, targets, weights

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "input_ids": self.inputs[index],
            "labels": self.targets[index],
            "weights": self.weights[index],
        }


class _PadCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = _pad_right([row["input_ids"] for row in rows], self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor([row["labels"] for row in rows], dtype=torch.float32),
            "weights": torch.tensor([row["weights"] for row in rows], dtype=torch.float32),
        }


class _WeightedRegressionTrainer(Trainer):
    """The plain Trainer with weighted MSE (TRL's RewardTrainer only knows preference pairs)."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by accumulation steps

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        targets, weights = inputs.pop("labels"), inputs.pop("weights")
        outputs = model(**inputs)
        loss = weighted_mse(outputs.logits.squeeze(-1).float(), targets, weights)
        return (loss, outputs) if return_outputs else loss


class _ProgressCallback(TrainerCallback):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress("train", state.global_step / max(state.max_steps, 1))


def _sequence_regressor(config: QFitConfig, base_model: str, pad_id: int) -> Any:
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=1, problem_type="regression", dtype=getattr(torch, config.dtype)
    )
    # The regressor reads the last non-pad token, so it must know the pad id.
    model.config.pad_token_id = pad_id
    return model


def _fit_finetune(
    inputs: list[list[int]],
    targets: list[float],
    weights: list[float],
    config: QFitConfig,
    pad_id: int,
    work_dir: Path,
    progress: Progress | None,
) -> Any:
    set_seed(config.seed)  # the score head and LoRA A matrices are initialised at random
    model = _sequence_regressor(config, config.base_model, pad_id)
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        modules_to_save=["score"],
    )
    model = get_peft_model(model, lora)
    device = resolve_device(config.device)
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        seed=config.seed,
        use_cpu=device.type == "cpu",
        bf16=config.dtype == "bfloat16" and device.type == "cuda",
        fp16=config.dtype == "float16" and device.type == "cuda",
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
    )
    trainer = _WeightedRegressionTrainer(
        model=model,
        args=args,
        train_dataset=_RegressionRows(inputs, targets, weights),
        data_collator=_PadCollator(pad_id),
        callbacks=[_ProgressCallback(progress)] if progress is not None else None,
    )
    # Our own callback reports progress; the default printer would print() every log line.
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    for entry in trainer.state.log_history:
        log.info("q finetune: %s", entry)
    model.eval()
    return model


# -- the model ------------------------------------------------------------------------------


class QModel:
    """A fitted Q: score (system, state, reply) triples in batches, without gradients."""

    def __init__(
        self,
        *,
        config: QFitConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        network: nn.Module | None = None,
        head: QHead | None = None,
        lexical: LexicalLinear | None = None,
        return_offset: float = 0.0,
        metrics: QMetrics | None = None,
        fit: dict[str, float | None] | None = None,
    ) -> None:
        if config.kind == "lexical":
            if lexical is None or network is not None or head is not None:
                raise ValueError("a lexical Q model is its lexical ridge alone")
        elif tokenizer is None or network is None or lexical is not None:
            raise ValueError(f"a {config.kind} Q model needs a tokenizer and a network")
        if config.kind == "head" and head is None:
            raise ValueError("a head Q model needs its head")
        if config.kind == "finetune" and head is not None:
            raise ValueError("a finetune Q model has no separate head")
        self.config = config
        self.tokenizer = tokenizer
        self.network = network  # the frozen backbone (head) or the LoRA regressor (finetune)
        self.head = head
        self.lexical = lexical
        self.return_offset = return_offset  # added to the regressor's output (finetune)
        self.metrics: QMetrics = metrics or {}
        self.fit: dict[str, float | None] = fit or {}  # the chosen ridge penalties
        self.device = (
            next(network.parameters()).device if network is not None else torch.device("cpu")
        )
        if head is not None:
            head.to(self.device)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def language_model(self) -> tuple[PreTrainedTokenizerBase, nn.Module]:
        """(tokenizer, network) of a head or finetune Q."""
        if self.tokenizer is None or self.network is None:
            raise ValueError(f"a {self.kind} Q model has no language model")
        return self.tokenizer, self.network

    def score(self, items: Sequence[ScoreItem], *, batch_size: int = 16) -> list[float]:
        """Q of each (system, state, candidate reply)."""
        if not items:
            return []
        if self.lexical is not None:
            return self.lexical.predict(items)
        tokenizer, network = self.language_model
        inputs = render_q_inputs(tokenizer, items, self.config.max_length, self.config.reply_budget)
        pad_id = int(tokenizer.pad_token_id)
        network.eval()
        if self.head is not None:
            pooling = self.config.head_pooling
            features = pooled_features(
                network, inputs, poolings=[pooling], batch_size=batch_size, pad_id=pad_id
            )
            return _apply(self.head, features[pooling])
        values = [0.0] * len(inputs)
        ids = [x.ids for x in inputs]
        with torch.inference_mode():
            for batch in _length_batches(ids, batch_size):
                input_ids, attention_mask = _pad_right([ids[i] for i in batch], pad_id)
                logits = network(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                ).logits
                for index, value in zip(batch, logits[:, 0].float().cpu(), strict=True):
                    values[index] = float(value) + self.return_offset
        return values

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.lexical is not None:
            save_lexical(self.lexical, path)
        elif self.head is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(state, str(path / HEAD_FILE))
        else:
            _, network = self.language_model
            network.save_pretrained(str(path / ADAPTER_DIR))  # type: ignore[operator]
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "base_model": self.config.base_model,
            "config": self.config.as_dict(),
            "return_offset": self.return_offset,
            "metrics": self.metrics,
            "fit": self.fit,
        }
        # Written last: a directory with a manifest is a complete model.
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    @classmethod
    def load(
        cls, path: str | Path, *, device: str | None = None, base_model: str | None = None
    ) -> QModel:
        """Reload a fitted Q; base_model overrides the recorded path (the checkpoint moved)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {path}: not a fitted Q model")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path}: unsupported format {manifest.get('format_version')}"
            )
        # A model saved before max_reply_length saw its text cut from the left as a whole.
        config = QFitConfig.from_dict({"max_reply_length": 0, **manifest["config"]})
        config = replace(
            config, base_model=base_model or config.base_model, device=device or config.device
        )
        fit = manifest.get("fit", {})  # absent in models saved before the ridge head
        if config.kind == "lexical":
            return cls(
                config=config, lexical=load_lexical(path), metrics=manifest["metrics"], fit=fit
            )
        tokenizer = load_tokenizer(config.base_model)
        target = resolve_device(config.device)
        head: QHead | None = None
        network: Any
        if config.kind == "head":
            network = _frozen_backbone(config, target)
            state = load_file(str(path / HEAD_FILE))
            head = QHead(state["feature_mean"].numel(), config.head_hidden)
            head.load_state_dict(state)
            head.eval()
        else:
            with _quiet_load_report():  # the score head is "missing" until the adapter loads
                regressor = _sequence_regressor(config, config.base_model, tokenizer.pad_token_id)
            network = PeftModel.from_pretrained(regressor, str(path / ADAPTER_DIR))
            network.to(target)
            network.eval()
        return cls(
            config=config,
            tokenizer=tokenizer,
            network=network,
            head=head,
            return_offset=float(manifest["return_offset"]),
            metrics=manifest["metrics"],
            fit=fit,
        )


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Hide transformers' weight-loading report where its missing or unexpected keys are meant."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _frozen_backbone(config: QFitConfig, device: torch.device) -> Any:
    """The base model without its LM head, cut after head_depth of its decoder layers."""
    n_layers = int(AutoConfig.from_pretrained(config.base_model).num_hidden_layers)
    keep = max(1, round(config.head_depth * n_layers))
    # Building the model with fewer layers skips their weights: the cut saves their compute.
    with _quiet_load_report():  # the skipped layers' weights are "unexpected" by design
        backbone = AutoModel.from_pretrained(
            config.base_model, dtype=getattr(torch, config.dtype), num_hidden_layers=keep
        )
    backbone.requires_grad_(False)
    backbone.to(device)
    backbone.eval()
    return backbone


# -- fitting --------------------------------------------------------------------------------


def fit_q(
    train: Sequence[StepExample],
    eval: Sequence[StepExample] | None,
    config: QFitConfig,
    output_dir: Path,
    progress: Progress | None = None,
) -> QFitResult:
    """Fit Q (and V beside it) on the training examples, evaluate on eval (or a held-out
    share), save Q to output_dir.

    progress, if given, is called with (stage, fraction done), stage one of "features",
    "train", "evaluate".
    """
    started = time.monotonic()
    if config.kind != "lexical" and not config.base_model:
        raise ValueError("config.base_model must name the base model checkpoint")
    if not train:
        raise ValueError("no training examples")
    if eval is None:
        train, eval = split_by_conversation(train, config.eval_fraction, config.seed)
    train = subsample_examples(train, config.max_examples, config.seed)
    if not train:
        raise ValueError("no training examples left after holding out the eval conversations")
    log.info("fitting a %s Q on %d examples (%d held out)", config.kind, len(train), len(eval))
    fitted = (
        _fit_lexical_q(train, eval, config, progress)
        if config.kind == "lexical"
        else _fit_language_model_q(train, eval, config, progress)
    )
    model = fitted.model
    if eval:
        model.metrics = held_out_metrics(
            fitted.eval_q,
            eval,
            v_values=fitted.eval_v,
            n_boot=config.eval_bootstrap,
            seed=config.seed,
        )
        log.info("held-out Q metrics: %s", model.metrics)
    model.save(output_dir)
    if progress is not None:
        progress("evaluate", 1.0)
    return QFitResult(
        path=output_dir,
        model=model,
        metrics=model.metrics,
        fit=model.fit,
        value=fitted.value,
        n_train=len(train),
        n_eval=len(eval),
        seconds=time.monotonic() - started,
    )


class _Fitted(NamedTuple):
    model: QModel
    value: QHead | LexicalLinear
    eval_q: list[float]  # Q and V on the eval examples (empty lists: none)
    eval_v: list[float]


def _fit_lexical_q(
    train: Sequence[StepExample],
    eval: Sequence[StepExample],
    config: QFitConfig,
    progress: Progress | None,
) -> _Fitted:
    fitted = fit_lexical(
        [(e.system, e.state, e.action) for e in train],
        [float(e.ret) for e in train],
        [float(e.weight) for e in train],
        [e.conversation_id for e in train],
        max_ngram=config.lexical_max_ngram,
        min_df=config.lexical_min_df,
        alphas=config.lexical_alphas,
        n_folds=config.head_cv_folds,
    )
    if progress is not None:
        progress("train", 1.0)
    fit: dict[str, float | None] = {"head_alpha": fitted.q_alpha, "v_alpha": fitted.v_alpha}
    model = QModel(config=config, lexical=fitted.q, fit=fit)
    items = [(e.system, e.state, e.action) for e in eval]
    return _Fitted(model, fitted.value, model.score(items), fitted.value.predict(items))


def _fit_language_model_q(
    train: Sequence[StepExample],
    eval: Sequence[StepExample],
    config: QFitConfig,
    progress: Progress | None,
) -> _Fitted:
    """The head or finetune kind, and V on the frozen backbone's state features."""
    tokenizer = load_tokenizer(config.base_model)
    pad_id = int(tokenizer.pad_token_id)
    inputs = render_q_inputs(
        tokenizer,
        [(e.system, e.state, e.action) for e in train],
        config.max_length,
        config.reply_budget,
    )
    eval_inputs = render_q_inputs(
        tokenizer,
        [(e.system, e.state, e.action) for e in eval],
        config.max_length,
        config.reply_budget,
    )
    targets = [float(e.ret) for e in train]
    weights = [float(e.weight) for e in train]
    groups = [e.conversation_id for e in train]
    log.info("mean length %.0f tokens", sum(len(x.ids) for x in inputs) / len(inputs))
    # The frozen backbone gives the head's features and, for either kind, V's.
    backbone = _frozen_backbone(config, resolve_device(config.device))
    poolings = [config.head_pooling, STATE] if config.kind == "head" else [STATE]
    features = pooled_features(
        backbone,
        inputs,
        poolings=poolings,
        batch_size=config.batch_size,
        pad_id=pad_id,
        progress=progress,
    )
    eval_features = (
        pooled_features(
            backbone, eval_inputs, poolings=poolings, batch_size=config.batch_size, pad_id=pad_id
        )
        if eval_inputs
        else {}
    )
    value, v_alpha = fit_ridge_head(features[STATE], targets, weights, groups, config)
    fit: dict[str, float | None] = {"head_alpha": None, "v_alpha": v_alpha}
    model: QModel
    if config.kind == "head":
        pooled = features[config.head_pooling]
        if config.head_hidden == 0:
            head, fit["head_alpha"] = fit_ridge_head(pooled, targets, weights, groups, config)
            if progress is not None:
                progress("train", 1.0)
        else:
            head = train_head(
                pooled, torch.tensor(targets), torch.tensor(weights), config, progress
            )
        model = QModel(config=config, tokenizer=tokenizer, network=backbone, head=head, fit=fit)
    else:
        backbone = None  # V's features are computed: free its memory for the fine-tune
        # The score head has no bias: regress the deviation from the mean return instead.
        offset = float(np.average(targets, weights=weights))
        with tempfile.TemporaryDirectory(prefix="q-trainer-") as work_dir:
            regressor = _fit_finetune(
                [x.ids for x in inputs],
                [t - offset for t in targets],
                weights,
                config,
                pad_id,
                Path(work_dir),
                progress,
            )
        model = QModel(
            config=config, tokenizer=tokenizer, network=regressor, return_offset=offset, fit=fit
        )
    if not eval:
        return _Fitted(model, value, [], [])
    if progress is not None:
        progress("evaluate", 0.0)
    if model.head is not None:
        q_values = _apply(model.head, eval_features[config.head_pooling])
    else:
        q_values = model.score(
            [(e.system, e.state, e.action) for e in eval], batch_size=config.batch_size
        )
    return _Fitted(model, value, q_values, _apply(value, eval_features[STATE]))
