"""Suggestion latency and throughput through our API versus calling the same backend directly.

    python -m tests.benchmarks.bench_suggest [--backend embedded|vllm] [--requests 16]
        [--vllm-url URL] [--max-new-tokens 32] [--concurrency 1,8,32] [--results FILE]

Both sides get the same prompts (the API's own prompt builder makes them) and the same greedy
sampling; the direct side calls the backend interface in this process (under the OpenMP runtime
the server uses), the API side is a real uvicorn server process on the embedded SQLite store.
Prints p50/p99 latency and throughput at each concurrency, and the API/direct ratios from this
one run; with --results, appends them to the results file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from services.generation.base import (
    AdapterRef,
    GenerationBackend,
    GenerationRequest,
    SamplingParams,
)
from services.policies.prompt import Turn, build_prompt, system_prompt
from tests.benchmarks.results import append_result
from tests.real_model import prepared_smollm2
from tests.server import free_port

OPENERS = [
    "Hi, do you renovate kitchens? Mine is about 12 square meters.",
    "How much does a bathroom makeover cost?",
    "Can someone come by on Friday to give a quote?",
    "Do you also do flooring, or only kitchens?",
    "I need new cabinets but my budget is tight. Options?",
    "What warranty do you give on your work?",
    "Is it possible to keep my old countertop?",
    "How long does a full kitchen renovation take?",
]
BUSINESS = "bench-renovations"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _measure(call: Callable[[int], None], requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []

    def timed(i: int) -> None:
        started = time.perf_counter()
        call(i)
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(timed, range(requests)))
    wall = time.perf_counter() - started
    return {
        "p50": statistics.median(latencies),
        "p99": _percentile(latencies, 0.99),
        "throughput": requests / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "vllm"], default="embedded")
    parser.add_argument("--vllm-url", default="http://127.0.0.1:8001")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    # The direct side runs in this process: the same OpenMP runtime as the API server's
    # (`outcomeloop serve` relaunches with the configured one), or the ratio measures that.
    from services.openmp import relaunch_with_intel_openmp
    from services.settings import Settings

    relaunch_with_intel_openmp(Settings().openmp)
    levels = [int(c) for c in args.concurrency.split(",")]

    model = prepared_smollm2()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-suggest-"))
    env = {
        **os.environ,
        "OUTCOMELOOP_DATA_DIR": str(data_dir),
        "OUTCOMELOOP_BASE_MODEL": str(model),
        "OUTCOMELOOP_GENERATION_BACKEND": args.backend,
        "OUTCOMELOOP_VLLM_URL": args.vllm_url,
        "OUTCOMELOOP_TEMPERATURE": "0",
        "OUTCOMELOOP_MAX_NEW_TOKENS": str(args.max_new_tokens),
        "OUTCOMELOOP_LOG_LEVEL": "WARNING",
    }
    cli = [sys.executable, "-m", "services"]
    subprocess.run([*cli, "models", "prepare"], env=env, check=True, capture_output=True)
    key = subprocess.run(
        [*cli, "keys", "create", "--business", BUSINESS],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    adapter = AdapterRef("pi0", str(data_dir / "adapters" / "pi0"))
    backend: GenerationBackend
    if args.backend == "embedded":
        from services.generation.embedded import EmbeddedBackend

        backend = EmbeddedBackend(model, device="cpu")
    else:
        from services.generation.vllm import VllmBackend

        backend = VllmBackend(args.vllm_url)
    system = system_prompt(business_name=BUSINESS, business_prompt=None, persona_instruction=None)
    prompts = [
        build_prompt(
            [Turn("customer", o)],
            system=system,
            count_tokens=backend.count_tokens,
            max_prompt_tokens=backend.max_context_tokens - args.max_new_tokens,
        ).messages
        for o in OPENERS
    ]

    def direct(i: int) -> None:
        backend.generate(
            GenerationRequest(prompts[i % len(prompts)], adapter, sampling), timeout=600
        )

    port = free_port()
    log = (data_dir / "server.log").open("w")
    server = subprocess.Popen(
        [*cli, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(
        base_url=base,
        headers={"Authorization": f"Bearer {key}"},
        timeout=600,
        limits=httpx.Limits(max_connections=2 * max(levels)),
    )
    try:
        for _ in range(600):
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        conversations: list[str] = []

        def api(i: int) -> None:
            response = http.post(f"/v1/conversations/{conversations[i]}/suggestions", json={})
            response.raise_for_status()

        def fresh_conversations(n: int) -> None:
            conversations.clear()
            for i in range(n):
                cid = http.post("/v1/conversations", json={}).json()["id"]
                http.post(
                    f"/v1/conversations/{cid}/messages",
                    json={"role": "customer", "text": OPENERS[i % len(OPENERS)]},
                )
                conversations.append(cid)

        fresh_conversations(2)  # warm both sides up
        api(0), direct(0), api(1), direct(1)
        print(
            f"backend={args.backend} requests={args.requests} "
            f"max_new_tokens={args.max_new_tokens} greedy, cores={os.cpu_count()}"
        )
        print(f"{'conc':>4} {'side':>6} {'p50 s':>8} {'p99 s':>8} {'req/s':>8}")
        figures: dict[str, dict[str, float]] = {}
        for concurrency in levels:
            fresh_conversations(args.requests)
            ours = _measure(api, args.requests, concurrency)
            theirs = _measure(direct, args.requests, concurrency)
            for side, m in (("direct", theirs), ("api", ours)):
                print(
                    f"{concurrency:>4} {side:>6} {m['p50']:8.2f} {m['p99']:8.2f} "
                    f"{m['throughput']:8.2f}"
                )
            print(
                f"{concurrency:>4}  ratio api/direct: p50 {ours['p50'] / theirs['p50']:.2f}, "
                f"p99 {ours['p99'] / theirs['p99']:.2f}, "
                f"throughput {ours['throughput'] / theirs['throughput']:.2f}"
            )
            figures[str(concurrency)] = {
                **{f"api_{k}": round(v, 3) for k, v in ours.items()},
                **{f"direct_{k}": round(v, 3) for k, v in theirs.items()},
            }
        if args.results:
            append_result(
                args.results,
                "bench_suggest",
                {"backend": args.backend, "requests": args.requests, "by_concurrency": figures},
            )
    finally:
        http.close()
        server.terminate()
        server.wait(timeout=30)
        backend.close()


if __name__ == "__main__":
    main()
