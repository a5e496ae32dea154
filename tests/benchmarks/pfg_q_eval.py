"""Q on PersuasionForGood: held-out ROC AUC of a fitted Q against the donation outcome.

    python -m tests.benchmarks.pfg_q_eval [--kind head] [--gamma 1.0] [--max-examples 3000]
        [--max-length 256] [--epochs N] [--base-model DIR] [--output-dir DIR]

Fits Q on the train split's business decisions (subsampled by --max-examples, the same share
of every dialogue) and scores every decision of the dev split. Next to it, computed in the same
run on the same examples, the reference: logistic regression on TF-IDF word 1-2 grams of the
state and reply text (the corpus README reports 0.63 for the first half of the chat, 0.67 for
all of it). AUC at first-half decisions (step < n_steps / 2) is the figure that matters: late
in the chat the persuadee often says what they will give.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.data_sources.persuasionforgood import (
    DEFAULT_DATA_DIR,
    available,
    load_split,
    step_examples,
)
from workers.learning.configs import QFitConfig
from workers.learning.examples import StepExample
from workers.learning.q_model import QMetrics, fit_q, q_metrics, subsample_examples


def example_text(example: StepExample) -> str:
    return "\n".join([*(turn.text for turn in example.state), example.action])


def tfidf_baseline(train: Sequence[StepExample], dev: Sequence[StepExample]) -> list[float]:
    """P(outcome) from logistic regression on TF-IDF word 1-2 grams of state + reply."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform([example_text(e) for e in train])
    classifier = LogisticRegression(max_iter=2000)
    classifier.fit(features, [e.outcome for e in train])
    dev_features = vectorizer.transform([example_text(e) for e in dev])
    return [float(p) for p in classifier.predict_proba(dev_features)[:, 1]]


def row(name: str, metrics: QMetrics, seconds: float) -> str:
    def fmt(value: float | None) -> str:
        return "  n/a" if value is None else f"{value:.3f}"

    first, every = metrics["first_half"], metrics["all"]
    return (
        f"{name:<28} {fmt(first['auc']):>10} {fmt(every['auc']):>8} {fmt(every['mse']):>7} "
        f"{fmt(every['brier']):>7} {seconds:>9.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["head", "finetune"], default="head")
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--max-examples", type=int, default=3000, help="0 = the whole train split")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, help="epochs (finetune) or head_epochs (head)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, help="learning_rate or head_learning_rate")
    parser.add_argument("--head-hidden", type=int, default=0)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", type=Path, help="default: the prepared SmolLM2-135M")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--output-dir", type=Path, help="where the fitted Q is kept")
    args = parser.parse_args()

    if not available(args.data_dir):
        sys.exit(f"PersuasionForGood not found at {args.data_dir}")
    if args.base_model is None:
        from tests.real_model import prepared_smollm2

        args.base_model = prepared_smollm2()
    train = step_examples(load_split("train", args.data_dir), gamma=args.gamma)
    dev = step_examples(load_split("dev", args.data_dir), gamma=args.gamma)
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
        seed=args.seed,
        **overrides,
    )
    # fit_q subsamples with the same function and seed: the baseline sees the same rows.
    used = subsample_examples(train, config.max_examples, config.seed)
    print(
        f"PersuasionForGood: {len(used)} of {len(train)} train decisions "
        f"({len({e.conversation_id for e in used})} dialogues), {len(dev)} dev decisions "
        f"({len({e.conversation_id for e in dev})} dialogues), gamma {args.gamma}",
        flush=True,
    )

    started = time.monotonic()
    baseline = q_metrics(tfidf_baseline(used, dev), dev)
    baseline_seconds = time.monotonic() - started

    last_report = [0.0]

    def progress(stage: str, fraction: float) -> None:
        if time.monotonic() - last_report[0] > 60 or fraction >= 1.0:
            last_report[0] = time.monotonic()
            print(f"  {stage}: {fraction:.0%}", flush=True)

    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="pfg-q-"))
    result = fit_q(train, dev, config, output_dir, progress)

    print(f"\nQ fitted on {result.n_train} examples, scored on {result.n_eval}: {output_dir}")
    print(f"{'model':<28} {'AUC first':>10} {'AUC all':>8} {'MSE':>7} {'Brier':>7} {'seconds':>9}")
    print(row(f"Q {args.kind}", result.metrics, result.seconds))
    print(row("TF-IDF logistic (same run)", baseline, baseline_seconds))
    summary = {
        "config": config.as_dict(),
        "gamma": args.gamma,
        "n_train": result.n_train,
        "n_dev": result.n_eval,
        "q": {"metrics": result.metrics, "seconds": result.seconds},
        "tfidf": {"metrics": baseline, "seconds": baseline_seconds},
    }
    (output_dir / "pfg_q_eval.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
