"""Q on PersuasionForGood: held-out AUC and ranking measure of a fitted Q, with intervals.

    python -m tests.benchmarks.pfg_q_eval [--kind head|finetune|lexical|stack]
        [--poolings mean,state_reply] [--gamma 1.0] [--max-examples 3000] [--max-dev 0]
        [--max-length 256] [--epochs N] [--bootstrap 1000] [--base-model DIR] [--output-dir DIR]
        [--no-swap] [--cache-dir DIR] [--cv-folds K]

The runs behind the README's "Which Q" table:

    --kind lexical --max-examples 0 --cv-folds 5
    --kind stack --poolings mean --max-examples 600 --max-dev 550 --max-length 192 --no-swap
    --kind finetune --poolings mean --max-examples 120 --max-dev 120 --max-length 192 --epochs 1

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
kinds go through fit_q itself, one pooling at a time. `--kind lexical` is fit_q's lexical kind
(TF-IDF blocks + ridge, no language model; its own V). `--kind stack` runs the linear heads, the
lexical kind and their stack on the same rows: a weighted least-squares blend of the two Qs (and
of the two Vs) whose weights are fitted on their cross-fitted predictions (folds grouped by
dialogue), each component refitted on all the rows.

Every row states its fit's wall and CPU seconds on this machine (CPU counts every thread): for
the heads, the backbone's pass over the training decisions plus the ridge fits; scoring dev is
not counted. The TF-IDF row times its own fit the same way.
"""

from __future__ import annotations

import argparse
import hashlib
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
from numpy.typing import NDArray
from safetensors.torch import load_file, save_file

from tests.data_sources.persuasionforgood import (
    DEFAULT_DATA_DIR,
    available,
    load_split,
    step_examples,
)
from workers.learning.configs import Q_POOLINGS, QFitConfig
from workers.learning.examples import StepExample
from workers.learning.held_out import (
    QMetrics,
    conversation_resample_weights,
    held_out_metrics,
    percentile_interval,
    weighted_auc_rows,
)
from workers.learning.lexical import fit_lexical
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
from workers.learning.ridge import group_folds, normalised_weights


def example_text(example: StepExample) -> str:
    return "\n".join([*(turn.text for turn in example.state), example.action])


@dataclass(frozen=True)
class Clock:
    """Wall and CPU (all threads) seconds of a stretch of work."""

    wall: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: Clock) -> Clock:
        return Clock(self.wall + other.wall, self.cpu + other.cpu)


class Stopwatch:
    def __init__(self) -> None:
        self.wall, self.cpu = time.monotonic(), time.process_time()

    def read(self) -> Clock:
        return Clock(time.monotonic() - self.wall, time.process_time() - self.cpu)


def tfidf_baseline(
    train: Sequence[StepExample], *scored: Sequence[StepExample]
) -> tuple[list[list[float]], Clock]:
    """P(outcome) of each scored set, from logistic regression on TF-IDF word 1-2 grams of
    state + reply fitted on train; and the fit's time."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    watch = Stopwatch()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform([example_text(e) for e in train])
    classifier = LogisticRegression(max_iter=2000)
    classifier.fit(features, [e.outcome for e in train])
    fitted = watch.read()
    return [
        [
            float(p)
            for p in classifier.predict_proba(
                vectorizer.transform([example_text(e) for e in examples])
            )[:, 1]
        ]
        for examples in scored
    ], fitted


def interval(point: float | None, lo: float | None, hi: float | None) -> str:
    if point is None:
        return f"{'n/a':>19}"
    if lo is None or hi is None:
        return f"{point:.3f}{'':>14}"
    return f"{point:.3f} [{lo:.3f}, {hi:.3f}]"


HEADER = (
    f"{'model':<36} {'AUC first half':>20} {'AUC all':>20} {'MSE all':>20} "
    f"{'Brier all':>20} {'rank corr(Q-V, G-V)':>20} {'fit wall s':>10} {'fit CPU s':>10}"
)


def row(name: str, metrics: QMetrics, clock: Clock) -> str:
    first, every = metrics["first_half"], metrics["all"]
    rank = metrics.get("rank")
    ranked = (
        interval(rank["corr"], rank["corr_lo"], rank["corr_hi"])
        if rank is not None
        else interval(None, None, None)
    )
    return (
        f"{name:<36} {interval(first['auc'], first['auc_lo'], first['auc_hi']):>20} "
        f"{interval(every['auc'], every['auc_lo'], every['auc_hi']):>20} "
        f"{interval(every['mse'], every['mse_lo'], every['mse_hi']):>20} "
        f"{interval(every['brier'], every['brier_lo'], every['brier_hi']):>20} "
        f"{ranked:>20} {clock.wall:>10.1f} {clock.cpu:>10.1f}"
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


def auc_gaps(
    values: Sequence[float],
    reference: Sequence[float],
    examples: Sequence[StepExample],
    n_boot: int,
    seed: int,
) -> dict[str, tuple[float, float | None, float | None]]:
    """AUC of values minus AUC of reference over all decisions and the first half, with a
    paired 95% interval: both scored on the same resamples of dev dialogues (the resamples of
    held_out_metrics, same seed)."""
    weight = np.array([e.weight for e in examples], dtype=np.float64)
    w = np.vstack(
        [
            weight[None, :],
            conversation_resample_weights([e.conversation_id for e in examples], n_boot, seed)
            * weight,
        ]
    )
    outcome = np.array([e.outcome for e in examples], dtype=np.float64)
    first = np.array([e.step < e.n_steps / 2 for e in examples], dtype=bool)
    q, ref = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    gaps = {}
    for name, rows in (("all", np.ones(len(examples), dtype=bool)), ("first_half", first)):
        gap = weighted_auc_rows(w[:, rows], q[rows], outcome[rows]) - weighted_auc_rows(
            w[:, rows], ref[rows], outcome[rows]
        )
        gaps[name] = (float(gap[0]), *percentile_interval(gap[1:]))
    return gaps


def cache_file(
    cache_dir: Path | None, config: QFitConfig, poolings: Sequence[str], items: Sequence[Any]
) -> Path | None:
    """Where the backbone's features of these inputs under this config are kept, if anywhere:
    the name hashes everything they depend on."""
    if cache_dir is None:
        return None
    key = {
        "base_model": config.base_model,
        "max_length": config.max_length,
        "reply_budget": config.reply_budget,
        "head_depth": config.head_depth,
        "dtype": config.dtype,
        "poolings": list(poolings),
        "items": [
            [system, [[t.role, t.text] for t in state], reply] for system, state, reply in items
        ],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"features-{digest}.safetensors"


@dataclass(frozen=True)
class LinearHeads:
    q: dict[str, list[float]]  # pooling -> Q(s, a) on dev
    q_swapped: dict[str, list[float]]  # pooling -> Q(s, a') on dev, a' another dialogue's reply
    alpha: dict[str, float]
    v: list[float]  # V(s) on dev
    v_alpha: float
    fit_clock: Clock  # the backbone over the training decisions, and the ridge fits
    score_clock: Clock  # the backbone over dev and dev with swapped replies
    train_features: dict[str, torch.Tensor]  # pooling (and STATE) -> training features
    dev_features: dict[str, torch.Tensor]
    swapped_features: dict[str, torch.Tensor]


def linear_heads(
    train: Sequence[StepExample],
    dev: Sequence[StepExample],
    config: QFitConfig,
    poolings: Sequence[str],
    progress: Any,
    *,
    swap: bool = True,
    cache_dir: Path | None = None,
) -> LinearHeads:
    """fit_q's linear head for each pooling, and V, from one backbone pass per input set
    (without swap, Q on swapped replies is left empty; with cache_dir, the features are read
    from it when computed before, and written to it)."""
    tokenizer = load_tokenizer(config.base_model)
    backbone = _frozen_backbone(config, resolve_device(config.device))
    wanted = [*poolings, STATE]

    def features(examples: Sequence[StepExample]) -> dict[str, torch.Tensor]:
        items = [(e.system, e.state, e.action) for e in examples]
        cached = cache_file(cache_dir, config, wanted, items)
        if cached is not None and cached.is_file():
            return load_file(str(cached))
        inputs = render_q_inputs(tokenizer, items, config.max_length, config.reply_budget)
        pooled = pooled_features(
            backbone,
            inputs,
            poolings=wanted,
            batch_size=config.batch_size,
            pad_id=int(tokenizer.pad_token_id),
            progress=progress,
        )
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in pooled.items()}, str(cached))
        return pooled

    watch = Stopwatch()
    train_features = features(train)
    targets = [float(e.ret) for e in train]
    weights = [float(e.weight) for e in train]
    groups = [e.conversation_id for e in train]
    value, v_alpha = fit_ridge_head(train_features[STATE], targets, weights, groups, config)
    heads, alphas = {}, {}
    for pooling in poolings:
        heads[pooling], alphas[pooling] = fit_ridge_head(
            train_features[pooling], targets, weights, groups, config
        )
    fit_clock = watch.read()
    watch = Stopwatch()
    dev_features = features(dev)
    swapped_features = features(swapped_replies(dev, config.seed)) if swap else {}
    score_clock = watch.read()
    return LinearHeads(
        q={p: _apply(head, dev_features[p]) for p, head in heads.items()},
        q_swapped={
            p: _apply(head, swapped_features[p]) if swap else [] for p, head in heads.items()
        },
        alpha=alphas,
        v=_apply(value, dev_features[STATE]),
        v_alpha=v_alpha,
        fit_clock=fit_clock,
        score_clock=score_clock,
        train_features=train_features,
        dev_features=dev_features,
        swapped_features=swapped_features,
    )


@dataclass(frozen=True)
class Scored:
    """A Q and its V on dev, Q on dev with swapped replies, the fit's time."""

    q: list[float]
    q_swapped: list[float]
    v: list[float]
    clock: Clock
    fit: dict[str, Any]


def lexical_kind(
    train: Sequence[StepExample],
    dev: Sequence[StepExample],
    config: QFitConfig,
    output_dir: Path,
) -> tuple[Scored, QMetrics]:
    """fit_q's lexical kind on train (saved to output_dir), scored on dev; its own metrics."""
    lexical = replace(config, kind="lexical")
    watch = Stopwatch()
    result = fit_q(train, dev, lexical, output_dir)
    clock = watch.read()
    value = result.value
    assert not isinstance(value, torch.nn.Module)  # the lexical V, on the text
    dev_items = [(e.system, e.state, e.action) for e in dev]
    swapped = [(e.system, e.state, e.action) for e in swapped_replies(dev, config.seed)]
    scored = Scored(
        q=result.model.score(dev_items),
        q_swapped=result.model.score(swapped),
        v=value.predict(dev_items),
        clock=clock,
        fit=dict(result.fit),
    )
    return scored, result.metrics


def weighted_blend(
    columns: Sequence[Sequence[float] | NDArray[np.float64]],
    targets: Sequence[float],
    weights: Sequence[float],
) -> NDArray[np.float64]:
    """[intercept, w_1, ...]: weighted least squares of the targets on the columns, the w_k
    non-negative (a stack of regressions: a negative weight on one would only fit noise)."""
    from scipy.optimize import nnls

    w = normalised_weights(weights)
    x = np.column_stack(columns)
    y = np.asarray(targets, dtype=np.float64)
    x_mean, y_mean = w @ x / w.sum(), float(w @ y / w.sum())
    root = np.sqrt(w)
    slopes, _ = nnls((x - x_mean) * root[:, None], (y - y_mean) * root)
    return np.concatenate([[y_mean - float(x_mean @ slopes)], slopes])


def blend(coefficients: NDArray[np.float64], *columns: Sequence[float]) -> list[float]:
    return [float(v) for v in coefficients[0] + np.column_stack(columns) @ coefficients[1:]]


def stack_kind(
    train: Sequence[StepExample],
    dev: Sequence[StepExample],
    config: QFitConfig,
    heads: LinearHeads,
    lexical: Scored,
    pooling: str,
) -> Scored:
    """Q = c0 + c1 Q_lexical + c2 Q_head and V = d0 + d1 V_lexical + d2 V_head, the weights
    fitted on cross-fitted predictions over the training rows (folds grouped by dialogue); the
    components are the ones fitted on all rows. Its clock adds the cross-fitting to theirs."""
    watch = Stopwatch()
    targets = [float(e.ret) for e in train]
    weights = [float(e.weight) for e in train]
    groups = [e.conversation_id for e in train]
    items = [(e.system, e.state, e.action) for e in train]
    out_of_fold = {name: np.zeros(len(train)) for name in ("q_lex", "v_lex", "q_head", "v_head")}
    for fold_train, held in group_folds(groups, config.head_cv_folds):

        def pick(values: Sequence[Any], rows: Any = fold_train) -> list[Any]:
            return [values[int(i)] for i in rows]

        fitted = fit_lexical(
            pick(items),
            pick(targets),
            pick(weights),
            pick(groups),
            max_ngram=config.lexical_max_ngram,
            min_df=config.lexical_min_df,
            alphas=config.lexical_alphas,
            n_folds=config.head_cv_folds,
        )
        out_of_fold["q_lex"][held] = fitted.q.predict(pick(items, held))
        out_of_fold["v_lex"][held] = fitted.value.predict(pick(items, held))
        for name, features in (
            ("q_head", heads.train_features[pooling]),
            ("v_head", heads.train_features[STATE]),
        ):
            index = torch.from_numpy(np.asarray(fold_train))
            head, _ = fit_ridge_head(
                features[index], pick(targets), pick(weights), pick(groups), config
            )
            out_of_fold[name][held] = _apply(head, features[torch.from_numpy(np.asarray(held))])
    q_weights = weighted_blend([out_of_fold["q_lex"], out_of_fold["q_head"]], targets, weights)
    v_weights = weighted_blend([out_of_fold["v_lex"], out_of_fold["v_head"]], targets, weights)
    clock = watch.read() + heads.fit_clock + lexical.clock
    return Scored(
        q=blend(q_weights, lexical.q, heads.q[pooling]),
        q_swapped=(
            blend(q_weights, lexical.q_swapped, heads.q_swapped[pooling])
            if heads.q_swapped[pooling]
            else []
        ),
        v=blend(v_weights, lexical.v, heads.v),
        clock=clock,
        fit={"q_blend": q_weights.tolist(), "v_blend": v_weights.tolist()},
    )


def cross_validated(
    examples: Sequence[StepExample], config: QFitConfig, n_folds: int, output_dir: Path
) -> dict[str, Any]:
    """The lexical kind against TF-IDF on n_folds folds of train + dev dialogues (grouped): the
    dev split is one draw of about 100 dialogues, and AUCs vary a lot from draw to draw."""
    groups = [e.conversation_id for e in examples]
    folds: list[dict[str, Any]] = []
    print(f"{'fold':<6} {'lexical first half / all':>26} {'TF-IDF first half / all':>26}")
    for k, (fit_rows, held_rows) in enumerate(group_folds(groups, n_folds)):
        train = [examples[int(i)] for i in fit_rows]
        held = [examples[int(i)] for i in held_rows]
        result = fit_q(train, held, replace(config, kind="lexical"), output_dir / f"fold{k}")
        lexical = result.model.score([(e.system, e.state, e.action) for e in held])
        (baseline,), _ = tfidf_baseline(train, held)
        gaps = auc_gaps(lexical, baseline, held, config.eval_bootstrap, config.seed)
        tfidf = held_out_metrics(baseline, held, n_boot=0)
        fold = {
            "n_held": len(held),
            "lexical": [result.metrics["first_half"]["auc"], result.metrics["all"]["auc"]],
            "tfidf": [tfidf["first_half"]["auc"], tfidf["all"]["auc"]],
            "gap": gaps,
        }
        folds.append(fold)
        print(
            f"{k:<6} {fold['lexical'][0]:>12.3f} / {fold['lexical'][1]:.3f}"
            f" {fold['tfidf'][0]:>14.3f} / {fold['tfidf'][1]:.3f}   gap "
            f"{interval(*gaps['first_half'])} / {interval(*gaps['all'])}",
            flush=True,
        )
    mean = {
        name: [float(np.mean([f[name][i] for f in folds])) for i in (0, 1)]
        for name in ("lexical", "tfidf")
    }
    print(
        f"mean   {mean['lexical'][0]:>12.3f} / {mean['lexical'][1]:.3f}"
        f" {mean['tfidf'][0]:>14.3f} / {mean['tfidf'][1]:.3f}"
    )
    return {"folds": folds, "mean": mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["head", "finetune", "lexical", "stack"], default="head")
    parser.add_argument(
        "--poolings",
        default="mean,state_reply",
        help=f"comma-separated head poolings to compare, of {Q_POOLINGS} (stack: the first)",
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
    parser.add_argument(
        "--no-swap",
        action="store_true",
        help="skip the backbone pass over dev with swapped replies (and the contrast)",
    )
    parser.add_argument("--cache-dir", type=Path, help="keep the backbone's features here")
    parser.add_argument(
        "--cv-folds",
        type=int,
        default=0,
        help="lexical: also compare with TF-IDF on this many folds of train + dev dialogues",
    )
    args = parser.parse_args()

    if not available(args.data_dir):
        sys.exit(f"PersuasionForGood not found at {args.data_dir}")
    poolings = [p for p in args.poolings.split(",") if p]
    if not poolings or set(poolings) - set(Q_POOLINGS):
        sys.exit(f"--poolings must name some of {Q_POOLINGS}, not {args.poolings!r}")
    if args.base_model is None and args.kind != "lexical":
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
        kind="head" if args.kind == "stack" else args.kind,
        base_model=str(args.base_model or ""),
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
        f"max_length {config.max_length}, {config.eval_bootstrap} resamples of dev dialogues, "
        f"{torch.get_num_threads()} torch threads",
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

    def contrast(v: Sequence[float], q: Sequence[float], q_swapped: Sequence[float]) -> QMetrics:
        # Q(s, a) - Q(s, a') is zero for a Q that ignores the reply, whatever it knows about
        # the state; passing V + that difference makes `rank` its correlation.
        return metrics_of([vi + a - b for vi, a, b in zip(v, q, q_swapped, strict=True)], v)

    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="pfg-q-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, QMetrics, Clock]] = []
    dev_q: dict[str, tuple[str, list[float]]] = {}  # row name -> (summary key, Q on dev)
    summary: dict[str, Any] = {
        "config": config.as_dict(),
        "kind": args.kind,
        "gamma": args.gamma,
        "n_train": len(used),
        "n_dev": len(dev),
    }
    swaps: list[tuple[str, QMetrics]] = []
    v: list[float] | None = None  # the V beside the TF-IDF row
    v_name = ""

    def record(key: str, name: str, scored: Scored, metrics: QMetrics | None = None) -> None:
        rows.append((name, metrics or metrics_of(scored.q, scored.v), scored.clock))
        dev_q[name] = (key, scored.q)
        summary[key] = {
            "metrics": rows[-1][1],
            "fit": scored.fit,
            "fit_wall_s": scored.clock.wall,
            "fit_cpu_s": scored.clock.cpu,
        }
        if scored.q_swapped:
            swaps.append((name, contrast(scored.v, scored.q, scored.q_swapped)))
            summary[key]["swap"] = swaps[-1][1]

    if args.kind in ("head", "stack") and config.head_hidden == 0:
        heads = linear_heads(
            used, dev, config, poolings, progress, swap=not args.no_swap, cache_dir=args.cache_dir
        )
        print(
            f"\nbackbone over train + ridge fits: {heads.fit_clock.wall:.0f} s wall, "
            f"{heads.fit_clock.cpu:.0f} s CPU; over dev and dev with swapped replies: "
            f"{heads.score_clock.wall:.0f} s wall; V alpha {heads.v_alpha:g}",
            flush=True,
        )
        for pooling, values in heads.q.items():
            scored = Scored(
                values,
                heads.q_swapped[pooling],
                heads.v,
                heads.fit_clock,
                {"alpha": heads.alpha[pooling], "v_alpha": heads.v_alpha},
            )
            record(f"q_{pooling}", f"Q head {pooling} (a={heads.alpha[pooling]:g})", scored)
        v, v_name = heads.v, f"head {poolings[0]}"
        if args.kind == "stack":
            lexical, lexical_metrics = lexical_kind(used, dev, config, output_dir / "lexical")
            record(
                "q_lexical",
                f"Q lexical (a={lexical.fit['head_alpha']:g})",
                lexical,
                lexical_metrics,
            )
            stacked = stack_kind(used, dev, config, heads, lexical, poolings[0])
            print(f"stack weights: Q {stacked.fit['q_blend']}, V {stacked.fit['v_blend']}")
            record("q_stack", f"Q stack (lexical + head {poolings[0]})", stacked)
            v, v_name = stacked.v, "stack"
    elif args.kind == "lexical":
        lexical, lexical_metrics = lexical_kind(used, dev, config, output_dir / "lexical")
        record(
            "q_lexical", f"Q lexical (a={lexical.fit['head_alpha']:g})", lexical, lexical_metrics
        )
        v, v_name = lexical.v, "lexical"
    else:
        for pooling in poolings:
            pooled_config = QFitConfig.from_dict({**config.as_dict(), "head_pooling": pooling})
            watch = Stopwatch()
            result = fit_q(train, dev, pooled_config, output_dir / pooling, progress)
            # fit_q scores dev too: its time is in this clock
            rows.append((f"Q {config.kind} {pooling}", result.metrics, watch.read()))
            summary[f"q_{pooling}"] = {"metrics": result.metrics, "fit": result.fit}
    scored_sets, clock = tfidf_baseline(used, dev, swapped_replies(dev, config.seed))
    baseline, baseline_swapped = scored_sets
    rows.append(("TF-IDF logistic", metrics_of(baseline, v), clock))
    if args.cv_folds:
        print(f"\n{args.cv_folds}-fold cross-validation over train + dev dialogues:")
        summary["cv"] = cross_validated([*train, *dev], config, args.cv_folds, output_dir / "cv")
    summary["tfidf"] = {
        "metrics": rows[-1][1],
        "fit_wall_s": clock.wall,
        "fit_cpu_s": clock.cpu,
        "v": v_name or None,
    }
    if v is not None and swaps:
        swaps.append(("TF-IDF logistic", contrast(v, baseline, baseline_swapped)))
        summary["tfidf"]["swap"] = swaps[-1][1]

    print(f"\nscored on {len(dev)} dev decisions; 95% intervals from resampled dev dialogues")
    if v is not None:
        print(f"the TF-IDF row's rank uses the {v_name} V; every Q row its own V")
    if args.kind == "finetune":
        print("fit_q's times include its backbone pass for V and its scoring of dev")
    print(HEADER)
    for name, metrics, row_clock in rows:
        print(row(name, metrics, row_clock))
    print("\nAUC minus TF-IDF's, paired (the same resamples of dev dialogues): first half / all")
    for name, (key, values) in dev_q.items():
        gaps = auc_gaps(values, baseline, dev, config.eval_bootstrap, config.seed)
        summary[key]["auc_minus_tfidf"] = gaps
        print(f"{name:<36} {interval(*gaps['first_half']):>20} {interval(*gaps['all']):>20}")
    if swaps:
        print(
            "\nwithin-state contrast: corr(Q(s, a) - Q(s, a'), G - V), a' the reply of a "
            "decision in another dev dialogue"
        )
        for name, metrics in swaps:
            rank = metrics["rank"]
            print(f"{name:<36} {interval(rank['corr'], rank['corr_lo'], rank['corr_hi']):>20}")
    (output_dir / "pfg_q_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary: {output_dir / 'pfg_q_eval.json'}")


if __name__ == "__main__":
    main()
