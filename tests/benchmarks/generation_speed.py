"""Generation throughput of the embedded backend's engines, in one run: `transformers` (the
baseline: generate() with peft's mixed-adapter batches) against `fast` (workers/learning/engine.py).

    python -m tests.benchmarks.generation_speed [--concurrency 1,8,16,32]
        [--engines transformers,fast] [--max-new-tokens 40] [--temperature 0.8]
        [--requests-per-lane 2] [--openmp intel|bundled]
        [--baseline-openmp bundled|same] [--output FILE.json]

The default model (SmolLM2-135M-Instruct, float32, CPU) serving a LoRA arm (rank 16 on q/k/v/o,
non-zero), sampled at T = 0.8, top_p 0.95, as the API samples. Prompts are the API's own, built
by its prompt builder: one business's system prompt and a customer's message (~130 tokens), a
different message per request. At each concurrency c, c client threads each send
`requests-per-lane` requests back to back; throughput is generated tokens / wall seconds. Prints
one row per engine and concurrency, and the fast / baseline ratio at each concurrency.

The OpenMP runtime is part of the setup: `--openmp intel` (the default, as the CLI runs) re-executes
the benchmark with Intel's libiomp5 preloaded; `--openmp bundled` keeps torch's libgomp, under which
torch on a worker thread (both engines decode on one) is slower on few cores (services/openmp.py).
Each row says which runtime it ran under. By default the transformers baseline runs as every
process ran before services/openmp.py, under libgomp, in a child process of the same run
(`--baseline-openmp same` keeps it in this process, under this process's runtime).

The fast engine reuses the KV of a prompt's seen prefix (here the system prompt): that is part of
what is measured, as in production, and the row says how many prompt tokens it reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.generation.base import AdapterRef, GenerationRequest, SamplingParams
from services.openmp import active_runtime, relaunch_with_intel_openmp
from services.policies.prompt import Turn, build_prompt, system_prompt

if TYPE_CHECKING:
    from services.generation.embedded import EmbeddedBackend

MESSAGES = [
    "Hi, do you renovate kitchens? Mine is about 12 square meters and quite old.",
    "How much does a bathroom makeover cost, roughly, for a small flat?",
    "Can someone come by on Friday to give a quote for new flooring?",
    "Do you also do flooring, or only kitchens and bathrooms?",
    "I need new cabinets but my budget is tight. What options do I have?",
    "What warranty do you give on your work, and what does it cover?",
    "Is it possible to keep my old countertop and only replace the doors?",
    "How long does a full kitchen renovation take from start to finish?",
]
BUSINESS_PROMPT = (
    "You are the assistant of Brightside Renovations, a family business that renovates "
    "kitchens and bathrooms. Be warm and concrete, answer the customer's question, and "
    "propose a free on-site quote when it fits. Keep replies to two or three sentences."
)


def measure(
    backend: EmbeddedBackend,
    prompts: list[Any],
    adapter: AdapterRef,
    sampling: SamplingParams,
    concurrency: int,
    per_lane: int,
) -> dict[str, float]:
    def lane(index: int) -> tuple[int, float]:
        tokens, waited = 0, 0.0
        for k in range(per_lane):
            messages = prompts[(index * per_lane + k) % len(prompts)]
            started = time.perf_counter()
            result = backend.generate(GenerationRequest(messages, adapter, sampling), timeout=900)
            waited += time.perf_counter() - started
            tokens += sum(c.num_tokens for c in result.completions)
        return tokens, waited

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lanes = list(pool.map(lane, range(concurrency)))
    wall = time.perf_counter() - started
    tokens = sum(t for t, _ in lanes)
    requests = concurrency * per_lane
    return {
        "tokens": tokens,
        "seconds": round(wall, 2),
        "tok_s": round(tokens / wall, 1),
        "mean_latency_s": round(sum(w for _, w in lanes) / requests, 2),
    }


def baseline_in_child(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The transformers engine measured by this script in a child process under torch's
    bundled libgomp (the runtime of every process before services/openmp.py)."""
    with tempfile.TemporaryDirectory(prefix="genspeed-base-") as tmp:
        out = Path(tmp) / "rows.json"
        command = [
            sys.executable,
            "-m",
            "tests.benchmarks.generation_speed",
            "--engines=transformers",
            "--openmp=bundled",
            f"--concurrency={args.concurrency}",
            f"--max-new-tokens={args.max_new_tokens}",
            f"--temperature={args.temperature}",
            f"--requests-per-lane={args.requests_per_lane}",
            f"--output={out}",
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "KMP_BLOCKTIME")}
        subprocess.run(command, check=True, env=env, stdout=sys.stderr)
        rows: list[dict[str, Any]] = json.loads(out.read_text())
        for row in rows:
            print(json.dumps(row), flush=True)
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,8,16,32")
    parser.add_argument("--engines", default="transformers,fast")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--requests-per-lane", type=int, default=2)
    parser.add_argument(
        "--openmp",
        choices=["intel", "bundled"],
        default="intel",
        help="the OpenMP runtime, as OUTCOMELOOP_OPENMP (services/openmp.py); intel re-executes",
    )
    parser.add_argument(
        "--baseline-openmp",
        choices=["same", "bundled"],
        default="bundled",
        help="bundled: the transformers baseline runs as deployed before services/openmp.py, "
        "under libgomp, in a child process of this run; same: in this process",
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    relaunch_with_intel_openmp(args.openmp)  # before torch loads
    engines = args.engines.split(",")
    rows: list[dict[str, Any]] = []
    if (
        "transformers" in engines
        and args.baseline_openmp == "bundled"
        and active_runtime() != "bundled"
    ):
        engines.remove("transformers")
        rows.extend(baseline_in_child(args))
    from services.generation.embedded import EmbeddedBackend
    from tests.real_model import prepared_smollm2
    from workers.learning.adapters import LoraSpec, create_zero_adapter, perturb_adapter

    levels = [int(c) for c in args.concurrency.split(",")]
    model = prepared_smollm2()
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=0.95
    )
    with tempfile.TemporaryDirectory(prefix="genspeed-") as tmp:
        zero = create_zero_adapter(model, Path(tmp) / "zero", LoraSpec())
        arm = AdapterRef("arm", str(perturb_adapter(zero, Path(tmp) / "arm", scale=0.05, seed=0)))
        for engine in engines:
            backend = EmbeddedBackend(
                model,
                device="cpu",
                dtype="float32",
                max_batch_size=max(levels),
                engine=engine,
            )
            system = system_prompt(
                business_name="Brightside Renovations",
                business_prompt=BUSINESS_PROMPT,
                persona_instruction=None,
            )
            prompts = [
                build_prompt(
                    [Turn("customer", m)],
                    system=system,
                    count_tokens=backend.count_tokens,
                    max_prompt_tokens=backend.max_context_tokens - args.max_new_tokens,
                ).messages
                for m in MESSAGES
            ]
            prompt_tokens = [backend.count_tokens(p) for p in prompts]
            backend.generate(GenerationRequest(prompts[0], arm, sampling), timeout=900)  # warm-up
            for concurrency in levels:
                before = backend.engine.stats.reused_tokens if backend.engine else 0
                row = {
                    "engine": backend.engine_name,
                    "concurrency": concurrency,
                    **measure(backend, prompts, arm, sampling, concurrency, args.requests_per_lane),
                    "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1),
                    "openmp": active_runtime(),
                }
                if backend.engine is not None:
                    row["reused_prompt_tokens"] = backend.engine.stats.reused_tokens - before
                rows.append(row)
                print(json.dumps(row), flush=True)
            backend.close()
    print()
    engines = sorted({r["engine"] for r in rows}, key=["transformers", "fast"].index)
    print(f"{'concurrency':>11} " + " ".join(f"{e + ' tok/s':>18}" for e in engines) + "  ratio")
    for concurrency in levels:
        values = {r["engine"]: r["tok_s"] for r in rows if r["concurrency"] == concurrency}
        ratio = ""
        if "transformers" in values and "fast" in values:
            ratio = f"  {values['fast'] / values['transformers']:.2f}x"
        print(f"{concurrency:>11} " + " ".join(f"{values.get(e, 0):>18}" for e in engines) + ratio)
    torch_threads = __import__("torch").get_num_threads()
    runtimes = ", ".join(sorted({f"{r['engine']} {r['openmp']}" for r in rows}))
    print(f"({os.cpu_count()} CPUs; torch threads {torch_threads}; OpenMP: {runtimes})")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
