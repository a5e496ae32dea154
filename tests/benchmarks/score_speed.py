"""PPO's pi_i log-probs of a batch of sampled replies: the engine's `score()` row by row (the
baseline) against `score_many()` (one teacher-forced pass for the batch), in one run.

    python -m tests.benchmarks.score_speed [--batch-size 8] [--rounds 6] [--openmp intel|bundled]

The default model (SmolLM2-135M-Instruct, float32, CPU), pi_0's zero adapter as pi_i, one batch
of simulated renovation states (the demo's PPO prompts) per round with replies sampled as PPO
samples them (T 0.8, top_p 0.95, 40 new tokens); each round scores that batch both ways, in
alternating order, each on a prefix cache holding only the system prompt (as PPO's pi_i arm does
after its first update: its cache keeps the prompts of earlier batches, which share the system
turn with a new batch). Prints seconds per batch and tokens computed, each way, and the ratio;
the log-probs of both must agree (1e-4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from services.openmp import active_runtime, relaunch_with_intel_openmp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--openmp", choices=["intel", "bundled"], default="intel")
    args = parser.parse_args(argv)
    relaunch_with_intel_openmp(args.openmp)  # before torch loads
    from services.simulator.scenarios import SCENARIOS
    from tests.benchmarks.ppo_diagnosis import states
    from tests.real_model import prepared_smollm2
    from workers.learning.adapters import LoraSpec, create_zero_adapter
    from workers.learning.configs import PPOConfig
    from workers.learning.engine import DecodeParams
    from workers.learning.policy_model import POLICY_ADAPTER, load_policy, load_tokenizer
    from workers.learning.ppo import REFERENCE_ADAPTER, rollout_engine, sync_policy

    model_dir = prepared_smollm2()
    prompts = states(SCENARIOS["renovation"], 24, seed=7)
    tokenizer = load_tokenizer(model_dir)
    timings: dict[str, list[float]] = {"score": [], "score_many": []}
    computed: dict[str, list[int]] = {"score": [], "score_many": []}
    with tempfile.TemporaryDirectory(prefix="score-speed-") as tmp:
        parent = create_zero_adapter(model_dir, Path(tmp) / "pi0", LoraSpec())
        model = load_policy(model_dir, parent, "cpu")
        model.load_adapter(str(parent), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.eval()
        engine = rollout_engine(model, tokenizer, PPOConfig(batch_size=args.batch_size))
        assert engine is not None
        try:
            sync_policy(engine, model)
            for round_ in range(args.rounds + 1):  # round 0 warms up, untimed
                start = (round_ * args.batch_size) % len(prompts)
                batch = (prompts + prompts)[start : start + args.batch_size]
                ids = [
                    list(
                        tokenizer(
                            tokenizer.apply_chat_template(
                                [m.as_dict() for m in messages],
                                tokenize=False,
                                add_generation_prompt=True,
                            ),
                            add_special_tokens=False,
                        )["input_ids"]
                    )
                    for messages in batch
                ]
                params = DecodeParams(
                    max_new_tokens=40, temperature=0.8, top_p=0.95, seed=round_, trace=True
                )
                futures = [engine.submit(p, POLICY_ADAPTER, params) for p in ids]
                samples = [f.result()[0] for f in futures]
                items = [
                    (p, s.tokens, s.trace.nucleus if s.trace else None)
                    for p, s in zip(ids, samples, strict=True)
                ]
                system = _common(ids)
                results = {}
                order = ["score", "score_many"] if round_ % 2 else ["score_many", "score"]
                for way in order:
                    engine.prefix.entries.clear()
                    engine.score([*system, ids[0][len(system)]], [0], REFERENCE_ADAPTER, 0.8)
                    before = engine.stats.scored_tokens
                    started = time.perf_counter()
                    if way == "score":
                        results[way] = [
                            engine.score(p, c, REFERENCE_ADAPTER, 0.8, nuclei=n)
                            for p, c, n in items
                        ]
                    else:
                        results[way] = engine.score_many(items, REFERENCE_ADAPTER, 0.8)
                    if round_:
                        timings[way].append(time.perf_counter() - started)
                        computed[way].append(engine.stats.scored_tokens - before)
                for a, b in zip(results["score"], results["score_many"], strict=True):
                    gap = max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
                    if gap > 1e-4:
                        raise SystemExit(f"score and score_many disagree by {gap}")
        finally:
            engine.close()
    row = {
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "openmp": active_runtime(),
        **{f"{way}_s_per_batch": round(statistics.median(t), 3) for way, t in timings.items()},
        **{f"{way}_tokens_per_batch": round(statistics.mean(c), 1) for way, c in computed.items()},
    }
    print(json.dumps(row))
    ratios = [m / s for m, s in zip(timings["score_many"], timings["score"], strict=True)]
    print(
        f"score_many / score: median {statistics.median(ratios):.2f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    return 0


def _common(rows: list[list[int]]) -> list[int]:
    n = 0
    while all(n < len(r) - 1 for r in rows) and len({r[n] for r in rows}) == 1:
        n += 1
    return rows[0][:n]


if __name__ == "__main__":
    sys.exit(main())
