"""Q on PersuasionForGood: held-out AUC and ranking measure of a fitted Q, with intervals.

    python -m tests.benchmarks.pfg_q_eval [--kind head] [--poolings mean,state_reply]
        [--gamma 1.0] [--max-examples 3000] [--max-dev 0] [--max-length 256] [--epochs N]
        [--bootstrap 1000] [--base-model DIR] [--output-dir DIR]

Fits Q on the train split's business decisions (subsampled by --max-examples, the same share
of every dialogue) and scores the dev split's decisions (all, or --max-dev of them, the same
share of every dev dialogue). Next to it, computed in the same run on the same examples, the
reference: logistic regression on TF-IDF word 1-2 grams of the state and reply text (the corpus
README reports 0.63 for the first half of the chat, 0.67 for all of it). AUC at first-half
decisions (step < n_steps / 2) is the figure that matters for outcomes: late in the chat the
persuadee often says what they will give.

Every held-out number comes with its 95% interval from resampling dev dialogues. `rank` is
the weighted correlation of Q - V with G - V on the dev decisions, V(s) a ridge on the state's
features alone (fitted on the same training decisions): whether Q ranks replies to a state,
which is what PPO uses. The TF-IDF row uses the same V (linear heads only). Below the table,
a check that needs no V: the correlation of Q(s, a) - Q(s, a') with G - V, a' the reply of a
decision in another dev dialogue; it is exactly zero for a Q that ignores the reply, however
much more than V it knows about the state.

With the linear head (the default: --kind head, --head-hidden 0) one pass of the backbone
serves every pooling in --poolings, each fitted in closed form exactly as fit_q does; other
kinds go through fit_q itself, one pooling at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.data_sources.persuasionforgood import (
    DEFAULT_DATA_DIR,
    available,
    load_split,
    step_examples,
)
from workers.learning.configs import Q_POOLINGS, QFitConfig
from workers.learning.examples import StepExample
from workers.learning.held_out import QMetrics, held_out_metrics
from workers.learning.q_model import (
    STATE,
    _apply,
    _frozen_backbone,
    fit_q,
    fit_ridge_head,
    load_tokenizer,
    pooled_features,
    render_q_inputs,
    resolve_device,
    subsample_examples,
)


def example_text(example: StepExample) -> str:
    return "\n".join([*(turn.text for turn in example.state), example.action])


def tfidf_baseline(
    train: Sequence[StepExample], *scored: Sequence[StepExample]
) -> list[list[float]]:
    """P(outcome) of each scored set, from logistic regression on TF-IDF word 1-2 grams of
    state + reply fitted on train."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform([example_text(e) for e in train])
    classifier = LogisticRegression(max_iter=2000)
    classifier.fit(features, [e.outcome for e in train])
    return [
        [
            float(p)
            for p in classifier.predict_proba(
                vectorizer.transform([example_text(e) for e in examples])
            )[:, 1]
        ]
        for examples in scored
    ]


def interval(point: float | None, lo: float | None, hi: float | None) -> str:
    if point is None:
        return f"{'n/a':>19}"
    if lo is None or hi is None:
        return f"{point:.3f}{'':>14}"
    return f"{point:.3f} [{lo:.3f}, {hi:.3f}]"


HEADER = (
    f"{'model':<30} {'AUC first half':>20} {'AUC all':>20} {'MSE all':>20} "
    f"{'Brier all':>20} {'rank corr(Q-V, G-V)':>20} {'seconds':>8}"
)


def row(name: str, metrics: QMetrics, seconds: float) -> str:
    first, every = metrics["first_half"], metrics["all"]
    rank = metrics.get("rank")
    ranked = (
        interval(rank["corr"], rank["corr_lo"], rank["corr_hi"])
        if rank is not None
        else interval(None, None, None)
    )
    return (
        f"{name:<30} {interval(first['auc'], first['auc_lo'], first['auc_hi']):>20} "
        f"{interval(every['auc'], every['auc_lo'], every['auc_hi']):>20} "
        f"{interval(every['mse'], every['mse_lo'], every['mse_hi']):>20} "
        f"{interval(every['brier'], every['brier_lo'], every['brier_hi']):>20} "
        f"{ranked:>20} {seconds:>8.0f}"
    )


def swapped_replies(examples: Sequence[StepExample], seed: int) -> list[StepExample]:
    """Each decision with the reply of a decision from another dialogue (dialogues in a seeded
    cycle, the k-th decision of one taking a reply of the next)."""
    by_dialogue: dict[str, list[StepExample]] = {}
    for example in examples:
        by_dialogue.setdefault(example.conversation_id, []).append(example)
    ids = sorted(by_dialogue)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    donor = {c: by_dialogue[order[(i + 1) % len(order)]] for i, c in enumerate(order)}
    seen: dict[str, int] = {}
    out = []
    for example in examples:
        k = seen.get(example.conversation_id, 0)
        seen[example.conversation_id] = k + 1
        replies = donor[example.conversation_id]
        out.append(replace(example, action=replies[k % len(replies)].action))
    return out


@dataclass(frozen=True)
class LinearHeads:
    q: dict[str, list[float]]  # pooling -> Q(s, a) on dev
    q_swapped: dict[str, list[float]]  # pooling -> Q(s, a') on dev, a' another dialogue's reply
    alpha: dict[str, float]
    v: list[float]  # V(s) on dev
    v_alpha: float
    backbone_seconds: float


def linear_heads(
    train: Sequence[StepExample],
    dev: Sequence[StepExample],
    config: QFitConfig,
    poolings: Sequence[str],
    progress: Any,
) -> LinearHeads:
    """fit_q's linear head for each pooling, and V, from one backbone pass per input set."""
    tokenizer = load_tokenizer(config.base_model)
    backbone = _frozen_backbone(config, resolve_device(config.device))
    wanted = [*poolings, STATE]

    def features(examples: Sequence[StepExample]) -> dict[str, torch.Tensor]:
        inputs = render_q_inputs(
            tokenizer,
            [(e.system, e.state, e.action) for e in examples],
            config.max_length,
            config.reply_budget,
        )
        return pooled_features(
            backbone,
            inputs,
            poolings=wanted,
            batch_size=config.batch_size,
            pad_id=int(tokenizer.pad_token_id),
            progress=progress,
        )

    started = time.monotonic()
    train_features, dev_features = features(train), features(dev)
    swapped_features = features(swapped_replies(dev, config.seed))
    backbone_seconds = time.monotonic() - started
    targets = [float(e.ret) for e in train]
    weights = [float(e.weight) for e in train]
    groups = [e.conversation_id for e in train]
    value, v_alpha = fit_ridge_head(train_features[STATE], targets, weights, groups, config)
    q, q_swapped, alphas = {}, {}, {}
    for pooling in poolings:
        head, alphas[pooling] = fit_ridge_head(
            train_features[pooling], targets, weights, groups, config
        )
        q[pooling] = _apply(head, dev_features[pooling])
        q_swapped[pooling] = _apply(head, swapped_features[pooling])
    return LinearHeads(
        q, q_swapped, alphas, _apply(value, dev_features[STATE]), v_alpha, backbone_seconds
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["head", "finetune"], default="head")
    parser.add_argument(
        "--poolings",
        default="mean,state_reply",
        help=f"comma-separated head poolings to compare, of {Q_POOLINGS}",
    )
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--max-examples", type=int, default=3000, help="0 = the whole train split")
    parser.add_argument("--max-dev", type=int, default=0, help="0 = every dev decision")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, help="epochs (finetune) or head_epochs (head)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, help="learning_rate or head_learning_rate")
    parser.add_argument("--head-hidden", type=int, default=0)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of dev dialogues")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", type=Path, help="default: the prepared SmolLM2-135M")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--output-dir", type=Path, help="where fitted Qs and the summary go")
    args = parser.parse_args()

    if not available(args.data_dir):
        sys.exit(f"PersuasionForGood not found at {args.data_dir}")
    poolings = [p for p in args.poolings.split(",") if p]
    if not poolings or set(poolings) - set(Q_POOLINGS):
        sys.exit(f"--poolings must name some of {Q_POOLINGS}, not {args.poolings!r}")
    if args.base_model is None:
        from tests.real_model import prepared_smollm2

        args.base_model = prepared_smollm2()
    train = step_examples(load_split("train", args.data_dir), gamma=args.gamma)
    dev = step_examples(load_split("dev", args.data_dir), gamma=args.gamma)
    dev = subsample_examples(dev, args.max_dev, args.seed)
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["epochs" if args.kind == "finetune" else "head_epochs"] = args.epochs
    if args.learning_rate is not None:
        key = "learning_rate" if args.kind == "finetune" else "head_learning_rate"
        overrides[key] = args.learning_rate
    config = QFitConfig(
        kind=args.kind,
        base_model=str(args.base_model),
        max_length=args.max_length,
        batch_size=args.batch_size,
        head_hidden=args.head_hidden,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        max_examples=args.max_examples,
        eval_bootstrap=args.bootstrap,
        seed=args.seed,
        **overrides,
    )
    # fit_q subsamples with the same function and seed: every model sees the same rows.
    used = subsample_examples(train, config.max_examples, config.seed)
    print(
        f"PersuasionForGood: {len(used)} of {len(train)} train decisions "
        f"({len({e.conversation_id for e in used})} dialogues), {len(dev)} dev decisions "
        f"({len({e.conversation_id for e in dev})} dialogues), gamma {args.gamma}, "
        f"max_length {config.max_length}, {config.eval_bootstrap} resamples of dev dialogues",
        flush=True,
    )

    last_report = [0.0]

    def progress(stage: str, fraction: float) -> None:
        if time.monotonic() - last_report[0] > 60 or fraction >= 1.0:
            last_report[0] = time.monotonic()
            print(f"  {stage}: {fraction:.0%}", flush=True)

    def metrics_of(values: Sequence[float], v: Sequence[float] | None) -> QMetrics:
        return held_out_metrics(
            values, dev, v_values=v, n_boot=config.eval_bootstrap, seed=config.seed
        )

    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="pfg-q-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, QMetrics, float]] = []
    summary: dict[str, Any] = {
        "config": config.as_dict(),
        "gamma": args.gamma,
        "n_train": len(used),
        "n_dev": len(dev),
    }
    swaps: list[tuple[str, QMetrics]] = []
    if config.kind == "head" and config.head_hidden == 0:
        started = time.monotonic()
        heads = linear_heads(used, dev, config, poolings, progress)
        seconds = time.monotonic() - started
        v = heads.v
        print(
            f"\nbackbone over train, dev and dev with swapped replies: "
            f"{heads.backbone_seconds:.0f} s; V alpha {heads.v_alpha:g}"
        )
        for pooling, values in heads.q.items():
            name = f"Q head {pooling} (a={heads.alpha[pooling]:g})"
            rows.append((name, metrics_of(values, v), seconds))
            # Q(s, a) - Q(s, a') is zero for a Q that ignores the reply, whatever it knows
            # about the state; passing V + that difference makes `rank` its correlation.
            contrast = [
                vi + qa - qb for vi, qa, qb in zip(v, values, heads.q_swapped[pooling], strict=True)
            ]
            swaps.append((f"Q head {pooling}", metrics_of(contrast, v)))
            summary[f"q_{pooling}"] = {
                "metrics": rows[-1][1],
                "alpha": heads.alpha[pooling],
                "swap": swaps[-1][1],
            }
        summary["v_alpha"] = heads.v_alpha
    else:
        v = None  # V's dev values stay inside fit_q: the TF-IDF row goes without a rank
        for pooling in poolings:
            pooled_config = QFitConfig.from_dict({**config.as_dict(), "head_pooling": pooling})
            result = fit_q(train, dev, pooled_config, output_dir / pooling, progress)
            rows.append((f"Q {config.kind} {pooling}", result.metrics, result.seconds))
            summary[f"q_{pooling}"] = {"metrics": result.metrics, "fit": result.fit}
    started = time.monotonic()
    baseline, baseline_swapped = tfidf_baseline(used, dev, swapped_replies(dev, config.seed))
    rows.append(("TF-IDF logistic", metrics_of(baseline, v), time.monotonic() - started))
    summary["tfidf"] = {"metrics": rows[-1][1]}
    if v is not None:
        contrast = [vi + a - b for vi, a, b in zip(v, baseline, baseline_swapped, strict=True)]
        swaps.append(("TF-IDF logistic", metrics_of(contrast, v)))
        summary["tfidf"]["swap"] = swaps[-1][1]

    print(f"\nscored on {len(dev)} dev decisions; 95% intervals from resampled dev dialogues")
    print(HEADER)
    for name, metrics, seconds in rows:
        print(row(name, metrics, seconds))
    if swaps:
        print(
            "\nwithin-state contrast: corr(Q(s, a) - Q(s, a'), G - V), a' the reply of a "
            "decision in another dev dialogue"
        )
        for name, metrics in swaps:
            rank = metrics["rank"]
            print(f"{name:<30} {interval(rank['corr'], rank['corr_lo'], rank['corr_hi']):>20}")
    (output_dir / "pfg_q_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary: {output_dir / 'pfg_q_eval.json'}")


if __name__ == "__main__":
    main()
