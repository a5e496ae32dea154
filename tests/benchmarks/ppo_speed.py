"""PPO's time per sample, rollouts through generate() (the baseline) against rollouts through the
serving engine, in one run.

    python -m tests.benchmarks.ppo_speed [--updates 5] [--batch-size 8] [--minibatch-size 4]
        [--epochs 2] [--learning-rate 1e-4]
        [--engines transformers,fast] [--attention dense,tree] [--by-conversation]
        [--openmp intel|bundled]
        [--output FILE.json]

The default model (SmolLM2-135M-Instruct, float32, CPU), pi_0's adapter as the parent, the
default demo's PPO settings (batch 8, minibatch 4, 2 epochs, 40 new tokens, lr 1e-4, beta 0.05;
`--full` demo's: --batch-size 16 --minibatch-size 8 --learning-rate 2e-4)
sampled as served (T 0.8, top_p 0.95), on simulated renovation states (the prompts PPO gets in
the demo), with the simulator's own score as the reward (cheap: the reward's cost is not what is
measured). Per engine: seconds per sample over all updates after the first (which loads and
warms up), split into the rollout (sampling, pi_i's log-probs, values) and the optimisation
epochs, and the tokens the optimisation computes per row and epoch. For the engine's rollouts,
also the floor (tests/benchmarks/floor.py): the linear layers' FLOPs per sample over the best
GEMM rate this run measured on the model's shapes, the least time any implementation of the
same computation needs on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from services.openmp import active_runtime, relaunch_with_intel_openmp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--minibatch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--engines", default="transformers,fast")
    parser.add_argument(
        "--attention",
        default="tree",
        help="dense,tree: the packed minibatches' attention (PPOConfig.tree_attention)",
    )
    parser.add_argument(
        "--by-conversation",
        action="store_true",
        help="PPOConfig.batch_by_conversation: rollouts of whole conversations' states",
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--openmp",
        choices=["intel", "bundled"],
        default="intel",
        help="the OpenMP runtime (services/openmp.py); intel re-executes with libiomp5",
    )
    args = parser.parse_args(argv)
    relaunch_with_intel_openmp(args.openmp)  # before torch loads
    from transformers import AutoConfig

    from services.simulator.scenarios import SCENARIOS
    from tests.benchmarks.floor import SampleWork, gemm_rate, linear_flops
    from tests.benchmarks.ppo_diagnosis import oracle, states
    from tests.real_model import prepared_smollm2
    from workers.learning.adapters import LoraSpec, create_zero_adapter
    from workers.learning.configs import PPOConfig
    from workers.learning.ppo import train_ppo

    model = prepared_smollm2()
    model_config = AutoConfig.from_pretrained(str(model))
    linear = linear_flops(model_config)
    gemm = gemm_rate(model_config)  # taken again after the runs: the best of both counts
    scenario = SCENARIOS["renovation"]
    prompts = states(scenario, 12, seed=5)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ppo-speed-") as tmp:
        parent = create_zero_adapter(model, Path(tmp) / "pi0", LoraSpec())
        variants = [
            (engine, attention)
            for engine in args.engines.split(",")
            for attention in args.attention.split(",")
        ]
        for engine, attention in variants:
            config = PPOConfig(
                tree_attention=attention == "tree",
                num_updates=args.updates,
                batch_size=args.batch_size,
                minibatch_size=min(args.minibatch_size, args.batch_size),
                n_ppo_epochs=args.epochs,
                max_new_tokens=40,
                learning_rate=args.learning_rate,
                beta=0.05,
                temperature=0.8,
                top_p=0.95,
                device="cpu",
                rollout_engine=engine,
                batch_by_conversation=args.by_conversation,
            )
            started = time.monotonic()
            _, history = train_ppo(
                base_model=model,
                parent_adapter=parent,
                prompts=prompts,
                reward_fn=oracle(scenario),
                config=config,
                output_dir=Path(tmp) / f"{engine}-{attention}",
                progress=lambda _what, _fraction: None,
            )
            timed = history[1:] or history
            samples = len(timed) * args.batch_size
            row = {
                "engine": engine,
                "attention": attention,
                "by_conversation": args.by_conversation,
                "batch_size": config.batch_size,
                "minibatch_size": config.minibatch_size,
                "n_ppo_epochs": config.n_ppo_epochs,
                "learning_rate": config.learning_rate,
                "updates_timed": len(timed),
                "samples": samples,
                "s_per_sample": round(
                    sum(h["rollout_seconds"] + h["optimise_seconds"] for h in timed) / samples, 3
                ),
                "rollout_s_per_sample": round(
                    sum(h["rollout_seconds"] for h in timed) / samples, 3
                ),
                "optimise_s_per_sample": round(
                    sum(h["optimise_seconds"] for h in timed) / samples, 3
                ),
                "reply_tokens": round(sum(h["reply_tokens"] for h in timed) / len(timed), 1),
                # Tokens the optimisation computes per row and epoch (shared prefixes once).
                "optimise_tokens_per_row": round(
                    sum(h["optimise_tokens_per_row"] for h in timed) / len(timed), 1
                ),
                "served_logprob_gap": max(
                    (h.get("served_logprob_gap", 0.0) for h in history), default=0.0
                ),
                "wall_s": round(time.monotonic() - started, 1),
                "openmp": active_runtime(),
            }
            if all("work_rollout_tokens" in h for h in timed):
                row["work"] = SampleWork(
                    samples=samples,
                    forward_tokens=int(sum(h["work_rollout_tokens"] for h in timed)),
                    forward_logits=int(sum(h["work_rollout_logits"] for h in timed)),
                    train_tokens=int(sum(h["work_train_tokens"] for h in timed)),
                    train_logits=int(sum(h["work_train_logits"] for h in timed)),
                )
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "work"}), flush=True)
    gemm = max(gemm, gemm_rate(model_config))
    for row in rows:
        work = row.pop("work", None)
        if work is None:  # generate()'s rollout: its forward tokens are not counted
            continue
        flops = work.flops(linear)
        row["gflop_per_sample"] = round(flops / 1e9, 1)
        row["gemm_gflops"] = round(gemm / 1e9, 1)
        row["floor_s_per_sample"] = round(flops / gemm, 3)
        print(
            f"{row['engine']}/{row['attention']}: {flops / 1e9:.1f} GFLOP per sample in the "
            f"linear layers (rollout {work.forward_tokens / work.samples:.0f} tokens, "
            f"optimisation {work.train_tokens / work.samples:.0f} per sample); at this run's "
            f"best GEMM rate, {gemm / 1e9:.1f} GFLOP/s, that is at least "
            f"{row['floor_s_per_sample']:.3f} s per sample; measured {row['s_per_sample']:.3f} "
            f"(floor / measured = {row['floor_s_per_sample'] / row['s_per_sample']:.2f})"
        )
    keys = ("s_per_sample", "rollout_s_per_sample", "optimise_s_per_sample")
    by = {(r["engine"], r["attention"]): r for r in rows}
    for attention in args.attention.split(","):
        fast, slow = by.get(("fast", attention)), by.get(("transformers", attention))
        if fast and slow:
            for key in keys:
                print(f"{key} ({attention}): fast / transformers = {fast[key] / slow[key]:.2f}")
    for engine in args.engines.split(","):
        tree, dense = by.get((engine, "tree")), by.get((engine, "dense"))
        if tree and dense:
            for key in keys:
                print(f"{key} ({engine}): tree / dense attention = {tree[key] / dense[key]:.2f}")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
