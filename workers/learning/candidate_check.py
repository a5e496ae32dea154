"""The candidate check: score pi_{i+1} against pi_i on held-out conversations before traffic.

For every logged decision of up to N held-out conversations (states PPO never trained on):

1. sample K replies from pi_i and K from pi_{i+1} (one base model, the two adapters, sampled
   exactly as served: the improvement config's temperature, top_p and max_new_tokens);
2. score the logged suggestion's log-probability under both, for the importance ratio
   rho = pi_{i+1}(a | s) / pi_i(a | s) times the logged behaviour ratio pi_i / mu;
3. score every reply with a check Q, cross-fitted: the held-out conversations are split in two
   folds of equal size (to one) by a hash of their id, and the states of one fold are scored
   by a linear head (ridge in closed form on the frozen backbone's features, as fit_q's
   `head`) fitted on the other fold's decisions. The check Q thus shares no data with the Q
   that PPO optimised (fitted on the training conversations) nor with the state it scores;
4. hand the scored decisions to workers/learning/evidence.py.

The Q that PPO optimised also scores the sampled replies: the report shows the gain it claims
beside the gain the check Q measures (a gap is PPO exploiting its reward's errors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.learning.chat import ChatMessage, Turn, chat_turns
from workers.learning.configs import QFitConfig
from workers.learning.engine import DecodeEngine, DecodeParams
from workers.learning.evidence import (
    ImprovementCheck,
    RateEstimates,
    ScoredDecision,
    improvement_check,
    rate_estimates,
)
from workers.learning.examples import StepExample
from workers.learning.policy_model import (
    end_token_ids,
    load_policy,
    load_tokenizer,
    resolve_device,
)
from workers.learning.ppo import (
    logprobs_of,
    nucleus_mask,
    peft_engine,
    reply_logits,
    reply_token_mask,
    sample_replies,
)
from workers.learning.q_model import (
    QHead,
    _apply,
    _frozen_backbone,
    fit_ridge_head,
    pooled_features,
    render_q_inputs,
)
from workers.learning.q_model import load_tokenizer as load_q_tokenizer

log = logging.getLogger(__name__)

CANDIDATE_ADAPTER = "candidate"
PARENT_ADAPTER = "default"  # load_policy's name for the adapter it loads
ABSTAIN_MARKER = "[ABSTAIN]"  # services.policies.prompt's: an abstention logged as the action
FOLDS = 2

Scorer = Callable[[Sequence[tuple[str | None, Sequence[Turn], str]]], list[float]]


class CheckUnavailable(ValueError):
    """Too little held-out data to cross-fit a check Q: the check cannot say anything."""


@dataclass(frozen=True)
class CheckDecision:
    """One logged decision of a held-out conversation (policy or exploration source)."""

    conversation_id: str
    index: int
    system: str | None
    state: tuple[Turn, ...]
    action: str
    reward: float
    behaviour_ratio: float  # pi_i / mu of the logged choice (0: an exploration persona)

    @classmethod
    def from_record(cls, row: dict[str, Any]) -> CheckDecision:
        return cls(
            conversation_id=str(row["conversation_id"]),
            index=int(row["index"]),
            system=row.get("system"),
            state=tuple(Turn(r, t) for r, t in row["state"]),
            action=str(row["action"]),
            reward=float(row["reward"]),
            behaviour_ratio=float(row["behaviour_ratio"]),
        )

    def as_record(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "index": self.index,
            "system": self.system,
            "state": [[t.role, t.text] for t in self.state],
            "action": self.action,
            "reward": self.reward,
            "behaviour_ratio": self.behaviour_ratio,
        }


@dataclass(frozen=True)
class CheckSettings:
    samples: int  # K replies per state and policy
    max_new_tokens: int
    temperature: float
    top_p: float
    clip: float  # bound on the cumulative importance weights
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"


@dataclass(frozen=True)
class CheckResult:
    check: ImprovementCheck
    rates: RateEstimates
    ppo_q_gain: float | None  # the mean gain the Q that PPO optimised claims, same replies
    seconds: float
    samples_file: Path


def _fold_key(conversation_id: str) -> bytes:
    return hashlib.sha256(f"check-fold:{conversation_id}".encode()).digest()


def fold_of(conversation_id: str) -> int:
    """A conversation's fold by its hash alone (for one the check Q was not fitted on)."""
    return _fold_key(conversation_id)[0] % FOLDS


def balanced_folds(conversation_ids: Iterable[str]) -> dict[str, int]:
    """Folds of equal size (to one): the conversations ranked by their hash, dealt in turn.

    A fold by hash alone can leave one fold with a single conversation (7 and 1 of 8 happens
    one time in 16), and then the other fold has no head to score it: its decisions drop out.
    """
    ranked = sorted(set(conversation_ids), key=lambda c: (_fold_key(c), c))
    return {c: rank % FOLDS for rank, c in enumerate(ranked)}


def prompt_of(system: str | None, state: Sequence[Turn]) -> list[ChatMessage]:
    return ([ChatMessage("system", system)] if system else []) + chat_turns(state)


# -- the policies ---------------------------------------------------------------------------


def sample_from(
    model: Any,
    tokenizer: Any,
    adapter: str,
    prompts: Sequence[list[ChatMessage]],
    settings: CheckSettings,
) -> list[list[str]]:
    """settings.samples replies per prompt from the named adapter."""
    model.set_adapter(adapter)
    flat = [p for p in prompts for _ in range(settings.samples)]
    texts: list[str] = []
    for start in range(0, len(flat), settings.batch_size):
        rollout = sample_replies(
            model,
            tokenizer,
            flat[start : start + settings.batch_size],
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
        )
        texts.extend(rollout.texts)
    k = settings.samples
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def sample_with_engine(
    engine: DecodeEngine,
    tokenizer: Any,
    adapter: str,
    prompts: Sequence[list[ChatMessage]],
    settings: CheckSettings,
) -> list[list[str]]:
    """settings.samples replies per prompt from the engine's arm (one prefill per prompt)."""
    futures = []
    for i, messages in enumerate(prompts):
        text = tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
        )
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        params = DecodeParams(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            n=settings.samples,
            seed=settings.seed * 1_000_003 + i,
        )
        futures.append(engine.submit(ids, adapter, params))
    return [
        [str(tokenizer.decode(s.tokens, skip_special_tokens=True)) for s in future.result()]
        for future in futures
    ]


def reply_logprobs(
    model: Any,
    tokenizer: Any,
    adapter: str,
    prompts: Sequence[list[ChatMessage]],
    replies: Sequence[str],
    settings: CheckSettings,
) -> list[float]:
    """log pi(reply | prompt) under the named adapter, as served: softmax(logits / T) over the
    sampler's nucleus when top_p < 1, the reply closed by the end token."""
    model.set_adapter(adapter)
    device = next(model.parameters()).device
    end_id = end_token_ids(model, tokenizer)[0]
    out: list[float] = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = range(start, min(start + settings.batch_size, len(prompts)))
        texts = [
            tokenizer.apply_chat_template(
                [m.as_dict() for m in prompts[i]], tokenize=False, add_generation_prompt=True
            )
            for i in chunk
        ]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        reply_ids = [
            tokenizer(replies[i], add_special_tokens=False)["input_ids"] + [end_id] for i in chunk
        ]
        width = max(len(r) for r in reply_ids)
        pad = tokenizer.pad_token_id
        replies_t = torch.full((len(reply_ids), width), pad, dtype=torch.long)
        for row, ids in enumerate(reply_ids):
            replies_t[row, : len(ids)] = torch.tensor(ids)
        mask = reply_token_mask(replies_t, [end_id])
        input_ids = torch.cat([encoded["input_ids"], replies_t], 1).to(device)
        attention = torch.cat([encoded["attention_mask"], mask.long()], 1).to(device)
        prompt_length = int(encoded["input_ids"].shape[1])
        with torch.no_grad():
            logits, _ = reply_logits(
                model, input_ids, attention, prompt_length, settings.temperature
            )
            tokens = input_ids[:, prompt_length:]
            nucleus = None
            if settings.top_p < 1.0:
                nucleus = nucleus_mask(logits, settings.top_p).scatter(
                    -1, tokens.unsqueeze(-1), True
                )
            logprobs = logprobs_of(logits, tokens, nucleus)
        out.extend((logprobs * mask.to(device)).sum(1).cpu().tolist())
    return [float(v) for v in out]


# -- the check Q ----------------------------------------------------------------------------


class CheckQ:
    """Out-of-fold linear heads on the frozen backbone's features: `score(fold, items)` scores
    states of `fold` with the head fitted on the other fold's decisions."""

    def __init__(self, config: QFitConfig, examples: Sequence[StepExample]) -> None:
        self.config = config
        self.tokenizer = load_q_tokenizer(config.base_model)
        self.backbone = _frozen_backbone(config, torch.device(resolve_device(config.device)))
        self.heads: dict[int, QHead | None] = {}
        self.folds = balanced_folds(e.conversation_id for e in examples)
        features = self._features([(e.system, e.state, e.action) for e in examples])
        for fold in range(FOLDS):
            # The head that scores `fold` is fitted on the others.
            rows = [i for i, e in enumerate(examples) if self.fold(e.conversation_id) != fold]
            if len({examples[i].conversation_id for i in rows}) < 2:
                self.heads[fold] = None  # too little data: that fold cannot be scored
                continue
            self.heads[fold], _ = fit_ridge_head(
                features[rows],
                [examples[i].ret for i in rows],
                [examples[i].weight for i in rows],
                [examples[i].conversation_id for i in rows],
                config,
            )

    def _features(self, items: Sequence[tuple[str | None, Sequence[Turn], str]]) -> torch.Tensor:
        inputs = render_q_inputs(
            self.tokenizer, items, self.config.max_length, self.config.reply_budget
        )
        pooling = self.config.head_pooling
        return pooled_features(
            self.backbone,
            inputs,
            poolings=[pooling],
            batch_size=self.config.batch_size,
            pad_id=int(self.tokenizer.pad_token_id),
        )[pooling]

    def fold(self, conversation_id: str) -> int:
        return self.folds.get(conversation_id, fold_of(conversation_id))

    def can_score(self, fold: int) -> bool:
        return self.heads.get(fold) is not None

    def score(
        self, fold: int, items: Sequence[tuple[str | None, Sequence[Turn], str]]
    ) -> list[float]:
        head = self.heads.get(fold)
        if head is None:
            raise ValueError(f"no check Q for fold {fold}")
        return _apply(head, self._features(items)) if items else []


# -- the check ------------------------------------------------------------------------------


def run_check(
    *,
    base_model: Path,
    parent_adapter: Path,
    candidate_adapter: Path,
    decisions: Sequence[CheckDecision],
    check_examples: Sequence[StepExample],
    q_config: QFitConfig,
    settings: CheckSettings,
    ppo_q: Scorer | None,
    output_dir: Path,
) -> CheckResult:
    """Sample, score and estimate (see the module's docstring); writes samples.jsonl."""
    started = time.monotonic()
    check_q = CheckQ(q_config, check_examples)
    scorable = [d for d in decisions if check_q.can_score(check_q.fold(d.conversation_id))]
    if not scorable:
        raise CheckUnavailable(
            "the candidate check has no held-out decision it can score: each fold of the "
            "held-out conversations needs decisions of at least 2 conversations in the other"
        )
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)
    tokenizer = load_tokenizer(base_model)
    model = load_policy(base_model, parent_adapter, device)
    model.load_adapter(str(candidate_adapter), adapter_name=CANDIDATE_ADAPTER)
    model.eval()
    prompts = [prompt_of(d.system, d.state) for d in scorable]
    engine = peft_engine(
        model,
        tokenizer,
        max_batch=max(settings.batch_size, settings.samples),
        adapters=list(model.peft_config),
    )
    try:
        sampled = {
            name: (
                sample_with_engine(engine, tokenizer, name, prompts, settings)
                if engine is not None
                else sample_from(model, tokenizer, name, prompts, settings)
            )
            for name in (PARENT_ADAPTER, CANDIDATE_ADAPTER)
        }
    finally:
        if engine is not None:
            engine.close()
    logged = [d.action for d in scorable]
    modelled = [d.action != ABSTAIN_MARKER for d in scorable]
    rows = [i for i, ok in enumerate(modelled) if ok]
    logp = {
        name: reply_logprobs(
            model, tokenizer, name, [prompts[i] for i in rows], [logged[i] for i in rows], settings
        )
        for name in (PARENT_ADAPTER, CANDIDATE_ADAPTER)
    }
    log_ratio = [0.0] * len(scorable)  # an abstention: pi_{i+1} assumed to abstain as pi_i did
    for j, i in enumerate(rows):
        log_ratio[i] = logp[CANDIDATE_ADAPTER][j] - logp[PARENT_ADAPTER][j]
    del model
    k = settings.samples
    q_check: dict[str, list[float]] = {"logged": [0.0] * len(scorable)}
    q_check.update({name: [0.0] * len(scorable) * k for name in sampled})
    for fold in range(FOLDS):
        members = [i for i, d in enumerate(scorable) if check_q.fold(d.conversation_id) == fold]
        if not members:
            continue
        items = [(scorable[i].system, scorable[i].state, scorable[i].action) for i in members]
        for i, value in zip(members, check_q.score(fold, items), strict=True):
            q_check["logged"][i] = value
        for name, replies in sampled.items():
            items = [
                (scorable[i].system, scorable[i].state, reply)
                for i in members
                for reply in replies[i]
            ]
            values = check_q.score(fold, items)
            for slot, i in enumerate(members):
                q_check[name][i * k : (i + 1) * k] = values[slot * k : (slot + 1) * k]
    ppo_scores: dict[str, list[float]] = {}
    if ppo_q is not None:
        for name, replies in sampled.items():
            ppo_scores[name] = ppo_q(
                [
                    (d.system, d.state, reply)
                    for d, rs in zip(scorable, replies, strict=True)
                    for reply in rs
                ]
            )
    scored = []
    for i, d in enumerate(scorable):
        new = q_check[CANDIDATE_ADAPTER][i * k : (i + 1) * k]
        old = q_check[PARENT_ADAPTER][i * k : (i + 1) * k]
        rho = d.behaviour_ratio * math.exp(min(log_ratio[i], 50.0))
        scored.append(
            ScoredDecision(
                conversation_id=d.conversation_id,
                index=d.index,
                reward=d.reward,
                q_logged=q_check["logged"][i],
                v_new=sum(new) / k,
                v_old=sum(old) / k,
                rho=rho,
            )
        )
    check = improvement_check(scored, n_boot=settings.n_boot, seed=settings.seed)
    rates = rate_estimates(scored, clip=settings.clip, n_boot=settings.n_boot, seed=settings.seed)
    ppo_q_gain = None
    if ppo_scores:
        n = len(scorable) * k
        ppo_q_gain = (sum(ppo_scores[CANDIDATE_ADAPTER]) - sum(ppo_scores[PARENT_ADAPTER])) / n
    output_dir.mkdir(parents=True, exist_ok=True)
    samples_file = output_dir / "samples.jsonl"
    with samples_file.open("w") as handle:
        for i, (d, s) in enumerate(zip(scorable, scored, strict=True)):
            record = {
                **d.as_record(),
                "fold": check_q.fold(d.conversation_id),
                "q_logged": s.q_logged,
                "log_ratio": log_ratio[i],
                "rho": s.rho,
                "replies": {
                    name: [
                        {
                            "text": reply,
                            "q_check": q_check[name][i * k + j],
                            "q_ppo": ppo_scores[name][i * k + j] if ppo_scores else None,
                        }
                        for j, reply in enumerate(sampled[name][i])
                    ]
                    for name in sampled
                },
            }
            handle.write(json.dumps(record) + "\n")
    log.info("candidate check: %s; rates: %s", check, rates)
    return CheckResult(
        check=check,
        rates=rates,
        ppo_q_gain=ppo_q_gain,
        seconds=time.monotonic() - started,
        samples_file=samples_file,
    )
