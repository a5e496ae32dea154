"""Training overhead: Q-fit rows/s and PPO tokens/s of our steps against a bare loop over the same
model without our pipeline, measured in one run.

    python -m tests.benchmarks.bench_training [--conversations 600] [--updates 5]
        [--parts q,ppo] [--results tests/benchmarks/results.jsonl]

Q (the default kind, `lexical`: a ridge on TF-IDF blocks of the state's and the reply's words),
on every business turn of simulated rep-alone conversations (renovation scenario), returns as
the pipeline computes them:
- ours: `fit_q` as the fit_q step runs it (vocabularies, Q and V each with its ridge penalty
  chosen by 5-fold grouped cross-validation over 9 penalties, the model saved), once on all rows
  and once as the step runs by default (10% of conversations held out, metrics with 1,000
  bootstrap resamples);
- bare: scikit-learn's TfidfVectorizer per block (same n-grams and min_df) and one weighted
  Ridge at the penalty ours chose; no V, no cross-validation, nothing saved;
- bare with the same cross-validation: that, plus V, each penalty chosen as ours chooses it
  (grouped 5-fold, 9 penalties, sparse conjugate gradients): the same work without our code.

PPO (the default demo's settings, as tests/benchmarks/ppo_speed.py: SmolLM2-135M-Instruct fp32 on
CPU, pi_0's adapter, batch 8, minibatch 4, 2 epochs, 40 new tokens, T 0.8, top_p 0.95, the
simulator's score as the reward):
- ours: `train_ppo` (rollouts from the serving engine, pi_i's log-probs for the KL, a value head
  and GAE, minibatches packed into a prefix tree, the served-log-prob check);
- bare: a plain loop on the same peft model: `generate()` with the same sampling, one no-grad
  forward for the old log-probs, then per epoch and minibatch a padded forward, the clipped
  policy loss with whitened rewards as advantages, backward, AdamW. No reference model, no value
  head, no KL.
Both report reply tokens per second over all updates after the first (warm-up), split into
rollout and optimisation.

Each ratio is ours / bare in rows/s or tokens/s (above 1: ours is faster than the bare loop; below
1: the pipeline's overhead). Appended to the results file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.openmp import relaunch_with_intel_openmp

RESULTS = Path(__file__).with_name("results.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=600)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--parts", default="q,ppo")
    parser.add_argument(
        "--results",
        type=lambda value: Path(value) if value else None,
        default=RESULTS,
        help="results file to append to ('' = none)",
    )
    args = parser.parse_args(argv)
    relaunch_with_intel_openmp("intel")  # as the workers run; before torch loads
    figures: dict[str, Any] = {}
    parts = set(args.parts.split(","))
    if "q" in parts:
        figures |= q_fit(args.conversations)
    if "ppo" in parts:
        figures |= ppo(args.updates)
    print(json.dumps(figures))
    if args.results:
        from tests.benchmarks.results import append_result

        append_result(args.results, "training", figures)
    return 0


def q_fit(conversations: int) -> dict[str, Any]:
    from services.simulator.scenarios import SCENARIOS
    from tests.benchmarks.sim_q_rank import history_examples
    from workers.learning.configs import QFitConfig
    from workers.learning.q_model import fit_q

    examples = history_examples(SCENARIOS["renovation"], conversations, seed=0)
    n = len(examples)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        config = QFitConfig(kind="lexical")
        started = time.perf_counter()
        result = fit_q(examples, [], config, Path(tmp) / "all")
        ours = time.perf_counter() - started
        alpha = float(result.fit["head_alpha"] or 1.0)
        started = time.perf_counter()
        held = fit_q(examples, None, config, Path(tmp) / "held-out")
        ours_step = time.perf_counter() - started
    started = time.perf_counter()
    bare_fit(examples, [alpha], config.lexical_max_ngram, config.lexical_min_df, 0)
    bare = time.perf_counter() - started
    started = time.perf_counter()
    bare_fit(
        examples,
        config.lexical_alphas,
        config.lexical_max_ngram,
        config.lexical_min_df,
        config.head_cv_folds,
    )
    bare_cv = time.perf_counter() - started
    figures = {
        "q_rows": n,
        "q_ours_rows_per_s": round(n / ours, 1),
        "q_ours_with_eval_rows_per_s": round(held.n_train / ours_step, 1),
        "q_bare_rows_per_s": round(n / bare, 1),
        "q_bare_cv_rows_per_s": round(n / bare_cv, 1),
        "q_ratio_ours_over_bare": round(bare / ours, 3),
        "q_ratio_ours_over_bare_cv": round(bare_cv / ours, 3),
        "q_ratio_with_eval_over_bare": round((held.n_train / ours_step) / (n / bare), 3),
    }
    print(
        f"Q fit on {n} rows: ours {figures['q_ours_rows_per_s']} rows/s "
        f"({figures['q_ours_with_eval_rows_per_s']} with the held-out evaluation), bare "
        f"{figures['q_bare_rows_per_s']} rows/s ({figures['q_bare_cv_rows_per_s']} with the same "
        f"cross-validation); ours / bare = {figures['q_ratio_ours_over_bare']} "
        f"({figures['q_ratio_with_eval_over_bare']} with the evaluation; "
        f"{figures['q_ratio_ours_over_bare_cv']} against the bare loop with the same "
        "cross-validation)",
        flush=True,
    )
    return figures


def bare_fit(
    examples: Sequence[Any], alphas: Sequence[float], max_ngram: int, min_df: int, folds: int
) -> Any:
    """TF-IDF per block and weighted ridges, straight from scikit-learn: Q on all four blocks
    at alphas[0] (folds 0), or, as ours does, Q and V (the state's blocks) each with its
    penalty chosen by grouped `folds`-fold cross-validation over `alphas`."""
    import numpy as np
    from scipy import sparse  # type: ignore[import-untyped]
    from sklearn.feature_extraction.text import TfidfVectorizer  # type: ignore[import-untyped]
    from sklearn.linear_model import Ridge  # type: ignore[import-untyped]
    from sklearn.model_selection import GroupKFold  # type: ignore[import-untyped]

    blocks: dict[str, list[str]] = {"customer": [], "business": [], "latest": [], "reply": []}
    for e in examples:
        customer = [t.text for t in e.state if t.role == "customer"]
        blocks["customer"].append("\n".join(customer))
        blocks["business"].append("\n".join(t.text for t in e.state if t.role != "customer"))
        blocks["latest"].append(customer[-1] if customer else "")
        blocks["reply"].append(e.action)
    matrices = {
        name: TfidfVectorizer(ngram_range=(1, max_ngram), min_df=min_df).fit_transform(texts)
        for name, texts in blocks.items()
    }
    y = np.asarray([float(e.ret) for e in examples])
    w = np.asarray([float(e.weight) for e in examples])
    groups = [e.conversation_id for e in examples]

    def ridge(x: Any) -> Any:
        if not folds:
            return Ridge(alpha=alphas[0]).fit(x, y, sample_weight=w)
        errors = np.zeros(len(alphas))
        for train, held in GroupKFold(n_splits=folds).split(x, groups=groups):
            for k, alpha in enumerate(alphas):
                model = Ridge(alpha=alpha, solver="sparse_cg", tol=1e-6)
                model.fit(x[train], y[train], sample_weight=w[train])
                errors[k] += w[held] @ (model.predict(x[held]) - y[held]) ** 2
        best = alphas[int(np.argmin(errors))]
        return Ridge(alpha=best, solver="sparse_cg", tol=1e-6).fit(x, y, sample_weight=w)

    q = ridge(sparse.hstack(list(matrices.values())).tocsr())
    if not folds:
        return q
    state = [matrices["customer"], matrices["business"], matrices["latest"]]
    return q, ridge(sparse.hstack(state).tocsr())


def ppo(updates: int) -> dict[str, Any]:
    from services.simulator.scenarios import SCENARIOS
    from tests.benchmarks.ppo_diagnosis import oracle, states
    from tests.real_model import prepared_smollm2
    from workers.learning.adapters import LoraSpec, create_zero_adapter
    from workers.learning.configs import PPOConfig
    from workers.learning.ppo import train_ppo

    model = prepared_smollm2()
    scenario = SCENARIOS["renovation"]
    prompts = states(scenario, 12, seed=5)
    config = PPOConfig(
        num_updates=updates,
        batch_size=8,
        minibatch_size=4,
        n_ppo_epochs=2,
        max_new_tokens=40,
        learning_rate=1e-4,
        beta=0.05,
        temperature=0.8,
        top_p=0.95,
        device="cpu",
    )
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        parent = create_zero_adapter(model, Path(tmp) / "pi0", LoraSpec())
        _, history = train_ppo(
            base_model=model,
            parent_adapter=parent,
            prompts=prompts,
            reward_fn=oracle(scenario),
            config=config,
            output_dir=Path(tmp) / "ours",
            progress=lambda _what, _fraction: None,
        )
        timed = history[1:] or history
        ours = {
            # reply_tokens: the mean per row of the update's batch
            "tokens": sum(h["reply_tokens"] * config.batch_size for h in timed),
            "rollout_s": sum(h["rollout_seconds"] for h in timed),
            "optimise_s": sum(h["optimise_seconds"] for h in timed),
        }
        bare = bare_ppo(model, parent, prompts, oracle(scenario), config)
    figures: dict[str, Any] = {
        "ppo_updates_timed": len(timed),
        # ours may stop an update's epochs early (KL): the bare loop always runs them all
        "ppo_ours_epochs_mean": round(sum(h["epochs"] for h in timed) / len(timed), 2),
    }
    for name, run in (("ours", ours), ("bare", bare)):
        seconds = run["rollout_s"] + run["optimise_s"]
        figures[f"ppo_{name}_tokens_per_s"] = round(run["tokens"] / seconds, 2)
        figures[f"ppo_{name}_rollout_tokens_per_s"] = round(run["tokens"] / run["rollout_s"], 2)
        figures[f"ppo_{name}_optimise_tokens_per_s"] = round(run["tokens"] / run["optimise_s"], 2)
    for what in ("", "rollout_", "optimise_"):
        figures[f"ppo_{what}ratio_ours_over_bare"] = round(
            figures[f"ppo_ours_{what}tokens_per_s"] / figures[f"ppo_bare_{what}tokens_per_s"], 3
        )
    print(
        f"PPO reply tokens/s: ours {figures['ppo_ours_tokens_per_s']} (rollout "
        f"{figures['ppo_ours_rollout_tokens_per_s']}, optimisation "
        f"{figures['ppo_ours_optimise_tokens_per_s']}), bare {figures['ppo_bare_tokens_per_s']} "
        f"(rollout {figures['ppo_bare_rollout_tokens_per_s']}, optimisation "
        f"{figures['ppo_bare_optimise_tokens_per_s']}); ours / bare = "
        f"{figures['ppo_ratio_ours_over_bare']}",
        flush=True,
    )
    return figures


def bare_ppo(
    model_path: Path,
    parent: Path,
    prompts: Sequence[Sequence[Any]],
    reward_fn: Callable[[Sequence[Any], Sequence[str]], list[float]],
    config: Any,
) -> dict[str, float]:
    """The plain loop (module docstring); reply tokens and seconds over updates after the first."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    tokenizer.padding_side = "left"
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32),
        str(parent),
        is_trainable=True,
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate
    )
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.seed))
    totals = {"tokens": 0.0, "rollout_s": 0.0, "optimise_s": 0.0}

    def token_logprobs(ids: torch.Tensor, attention: torch.Tensor, start: int) -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=attention).logits[:, start - 1 : -1]
        logprobs = torch.log_softmax(logits.float() / config.temperature, dim=-1)
        return logprobs.gather(-1, ids[:, start:, None]).squeeze(-1)

    for update in range(config.num_updates):
        picks = [
            int(order[(update * config.batch_size + i) % len(prompts)])
            for i in range(config.batch_size)
        ]
        batch = [prompts[i] for i in picks]
        started = time.perf_counter()
        encoded = tokenizer.apply_chat_template(
            [[m.as_dict() for m in messages] for messages in batch],
            add_generation_prompt=True,
            return_tensors="pt",
            padding=True,
            return_dict=True,
        )
        start = encoded["input_ids"].shape[1]
        model.eval()
        with torch.no_grad():
            ids = model.generate(
                **encoded,
                do_sample=True,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=0,
                max_new_tokens=config.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        replies = ids[:, start:]
        ended = (replies == tokenizer.eos_token_id).int()
        mask = ((ended.cumsum(1) - ended) == 0).float()  # up to and including the end token
        attention = torch.cat([encoded["attention_mask"], mask.long()], dim=1)
        texts = tokenizer.batch_decode(replies, skip_special_tokens=True)
        rewards = torch.tensor(reward_fn(batch, texts), dtype=torch.float32)
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        with torch.no_grad():
            old = token_logprobs(ids, attention, start)
        rolled = time.perf_counter()
        model.train()
        for _ in range(config.n_ppo_epochs):
            for mb in torch.arange(config.batch_size).split(config.minibatch_size):
                new = token_logprobs(ids[mb], attention[mb], start)
                ratio = torch.exp(new - old[mb])
                adv = advantages[mb, None]
                clipped = torch.clamp(ratio, 1 - config.cliprange, 1 + config.cliprange)
                loss = -(torch.min(ratio * adv, clipped * adv) * mask[mb]).sum() / mask[mb].sum()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        done = time.perf_counter()
        if update > 0 or config.num_updates == 1:
            totals["tokens"] += float(mask.sum())
            totals["rollout_s"] += rolled - started
            totals["optimise_s"] += done - rolled
    return totals


if __name__ == "__main__":
    sys.exit(main())
