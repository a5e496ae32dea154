"""How often does the pre-traffic estimate's interval contain the A/B result? Over demo seeds.

    python -m tests.benchmarks.estimate_coverage [--seeds 0,1,2] [--conversations 32]
        [--scenario renovation] [--output FILE.json] [--reports DIR]

Each seed runs the demo (SQLite, embedded default model, one iteration; about 20 minutes on 2
CPU cores) and reads, for the iteration's candidate: the direct and doubly robust estimates of
its outcome rate with their 95% intervals (the `check` step, before any traffic), and the
outcome rate its arm then reached in the A/B test (with its Wilson interval). It prints one row
per seed and, per estimator, how many intervals contained the measured rate with an exact
(Clopper-Pearson) 95% interval on that share. The measured rate is itself noisy (16 or so
conversations per arm at demo size): coverage of a point that noisy is a loose check.
With --reports, each seed's full demo report (terminal text and HTML) is kept there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from services.demo import DemoConfig, run_demo
from services.settings import get_settings


def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """The exact 95% interval of a binomial share k / n, by bisection on the binomial CDF."""

    def solve(target: float, successes: int) -> float:
        lo, hi = 0.0, 1.0  # P(X <= successes) falls as p grows
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _binomial_cdf(successes, n, mid) > target else (lo, mid)
        return (lo + hi) / 2

    lower = 1.0 - solve(0.025, n - k) if k > 0 else 0.0  # by symmetry on the failures
    upper = solve(0.025, k) if k < n else 1.0
    return lower, upper


def one_seed(
    seed: int, conversations: int, scenario: str, workdir: Path, reports: Path | None = None
) -> dict[str, Any]:
    config = replace(
        DemoConfig(seed=seed, scenario=scenario), conversations=conversations, iterations=1
    )
    result = run_demo(
        get_settings(),
        config,
        workdir=workdir,
        status=lambda text: print(f"  seed {seed}: {text}", file=sys.stderr),
        progress=lambda _what, _fraction: None,
    )
    row: dict[str, Any] = {"seed": seed, "minutes": round(result.seconds / 60, 1)}
    if reports is not None:
        _keep_report(result, reports / f"seed-{seed}")
    if not result.iterations or len(result.phases) < 2:
        return {**row, "error": "no iteration or no A/B phase"}
    summary = result.iterations[0]
    arm = next((a for a in result.phases[1].arms if a.policy == summary.candidate), None)
    if arm is None:
        return {**row, "error": "the candidate has no arm"}
    m = summary.metrics
    row.update(
        measured=arm.outcome_rate,
        measured_n=arm.ended,
        measured_interval=list(arm.interval),
        check_gain=[m.get("check_gain"), m.get("check_gain_lo"), m.get("check_gain_hi")],
        q_rank_corr=[m.get("q_rank_corr"), m.get("q_rank_corr_lo"), m.get("q_rank_corr_hi")],
    )
    if summary.scenario_check is not None:
        row["scenario_check_q"] = list(summary.scenario_check.check_q)
        row["scenario_ppo_q"] = list(summary.scenario_check.ppo_q)
    for name in ("estimate_direct", "estimate_dr"):
        value, lo, hi = m.get(name), m.get(f"{name}_lo"), m.get(f"{name}_hi")
        row[name] = [value, lo, hi]
        row[f"{name}_covers"] = (
            None if lo is None or hi is None else bool(lo <= arm.outcome_rate <= hi)
        )
    return row


def _keep_report(result: Any, stem: Path) -> None:
    from rich.console import Console

    from services.demo_report import print_report, render_html

    stem.parent.mkdir(parents=True, exist_ok=True)
    with stem.with_suffix(".txt").open("w") as handle:
        print_report(result, Console(file=handle, width=160, color_system=None))
    stem.with_suffix(".html").write_text(render_html(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--scenario", default="renovation")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--reports", type=Path, help="keep each seed's demo report here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            workdir = Path(tmp) / str(seed)
            rows.append(one_seed(seed, args.conversations, args.scenario, workdir, args.reports))
            print(json.dumps(rows[-1]), flush=True)
    for name in ("estimate_direct", "estimate_dr"):
        verdicts = [r[f"{name}_covers"] for r in rows if r.get(f"{name}_covers") is not None]
        k, n = sum(verdicts), len(verdicts)
        if n:
            lo, hi = clopper_pearson(k, n)
            print(
                f"{name}: interval contained the A/B rate in {k} of {n} seeds "
                f"(exact 95% CI of the share {lo:.2f} to {hi:.2f})"
            )
        else:
            print(f"{name}: no seed gave an interval")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
