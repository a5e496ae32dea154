"""PPO against DMPO, DPO on edits and no change, from the same logged data, in the simulator.

    python -m tests.benchmarks.improvement_comparison [--seeds 0 1 2] [--conversations 48]
        [--ab 160] [--algorithms ppo,dmpo,dpo] [--quick] [--output FILE.json]

Per seed: pi_0 serves `--conversations` simulated customers through the API (the simulated rep
accepts, edits or replaces each suggestion: the log DPO learns from); then one iteration per
algorithm from pi_0 on that same log, run as the demo runs it (the Q gate overridden where it
fails; each candidate checked before traffic); then one experiment with pi_0 as control and
every candidate as an arm, equal weights, over `--ab` new simulated customers.

Printed per seed and arm, then pooled over seeds: the outcome rate with its Wilson interval,
the difference to pi_0 with Newcombe's interval and the p-value the results API reports
(services/experiments/report.py), the share of suggestions sent as is (acceptance) with its
Wilson interval over answered suggestions, the simulator's score of the arm's suggestions
(clustered by conversation), the candidate check's estimate before traffic (held-out Q gain of
the candidate over pi_0 and the doubly robust outcome-rate estimate), and the iteration's wall
time. `--quick` runs every stage at toy sizes (nothing is measured).

CPU-bound: run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from services.openmp import relaunch_with_intel_openmp

# The improvement steps at the demo's scale: PPO as the default demo runs it, DMPO and DPO
# over their pairs twice, all at the demo's learning rate.
OFFLINE_HYPER: dict[str, Any] = {"n_epochs": 2, "batch_size": 4, "learning_rate": 1e-4, "beta": 0.1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--ab", type=int, default=160)
    parser.add_argument("--algorithms", default="ppo,dmpo,dpo")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    relaunch_with_intel_openmp("intel")  # before torch loads, as the demo does

    from services.db import session_scope
    from services.demo import (
        BUSINESS,
        DemoConfig,
        prepare_world,
        run_iteration,
        serve_in_thread,
        traffic_phase,
    )
    from services.experiments.report import compare
    from services.experiments.service import ArmSpec, create_experiment, stop_experiment
    from services.experiments.statistics import wilson_interval
    from services.generation.factory import build_backend
    from services.policies import service as policies
    from services.policies.bootstrap import PI0_ID
    from services.policies.models import PolicyStatus
    from services.settings import Settings
    from services.simulator.scenarios import SCENARIOS

    algorithms = [a for a in args.algorithms.split(",") if a]
    settings = Settings()
    rows: list[dict[str, Any]] = []

    def status(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    def progress(_what: str, _fraction: float) -> None:
        pass

    for seed in args.seeds:
        base = DemoConfig.quick_config(seed) if args.quick else DemoConfig(seed=seed)
        config = dataclasses.replace(base, conversations=args.conversations)
        scenario = SCENARIOS[config.scenario]
        with tempfile.TemporaryDirectory(prefix="improvement-comparison-") as tmp:
            demo_settings, factory, key, first = prepare_world(
                settings, config, Path(tmp) / "world", status
            )
            backend = build_backend(demo_settings)
            with serve_in_thread(demo_settings, backend) as url:
                started = time.monotonic()
                logged = traffic_phase(
                    url, key, scenario, config, factory, first, "pi0", 0, status, progress
                )
                status(f"seed {seed}: pi0 logged {logged.arms[0].ended} conversations")
                candidates: dict[str, tuple[str, Any]] = {}
                for number, algorithm in enumerate(algorithms, start=1):
                    hyper = None if algorithm == "ppo" else OFFLINE_HYPER
                    summary = run_iteration(
                        demo_settings,
                        factory,
                        config,
                        PI0_ID,
                        number,
                        status,
                        progress,
                        [],
                        algorithm=algorithm,
                        hyperparameters=hyper,
                        deploy=False,
                    )
                    if summary.candidate is None or not summary.status.startswith(
                        "awaiting_approval"
                    ):
                        status(f"seed {seed}: {algorithm} made no candidate: {summary.status}")
                        continue
                    candidates[algorithm] = (summary.candidate, summary)
                with session_scope(factory) as session:
                    stop_experiment(session, experiment_id=first)
                    for candidate, _ in candidates.values():  # the operator approves them
                        policies.transition(session, policy_id=candidate, to=PolicyStatus.APPROVED)
                    arms = [ArmSpec("control", PI0_ID, 1.0)] + [
                        ArmSpec(algorithm, candidate, 1.0)
                        for algorithm, (candidate, _) in candidates.items()
                    ]
                    comparison = create_experiment(
                        session, name=f"comparison seed {seed}", business_id=BUSINESS, arms=arms
                    ).id
                phase = traffic_phase(
                    url,
                    key,
                    scenario,
                    dataclasses.replace(config, conversations=args.ab),
                    factory,
                    comparison,
                    "comparison",
                    len(algorithms) + 1,
                    status,
                    progress,
                )
            backend.close()
        control = next(a for a in phase.arms if a.arm == "control")
        for arm in phase.arms:
            answered = sum(arm.relations.values())
            accepted = arm.relations.get("accepted", 0)
            score = phase.scores.get(arm.arm)
            summary = candidates.get(arm.arm, (None, None))[1]
            metrics = summary.metrics if summary is not None else {}
            row = {
                "seed": seed,
                "arm": arm.arm,
                "policy": arm.policy,
                "ended": arm.ended,
                "outcomes": arm.outcomes,
                "outcome_rate": arm.outcome_rate,
                "outcome_interval": arm.interval,
                "accepted": accepted,
                "answered": answered,
                "acceptance_interval": wilson_interval(accepted, answered),
                "score": None if score is None else score.mean,
                "score_interval": None if score is None else (score.low, score.high),
                "iteration_seconds": None if summary is None else round(summary.seconds, 1),
                "check_gain": metrics.get("check_gain"),
                "check_gain_interval": (metrics.get("check_gain_lo"), metrics.get("check_gain_hi")),
                "estimate_dr": metrics.get("estimate_dr"),
                "improve_pairs": metrics.get("improve_pairs"),
                "logged_conversations": logged.arms[0].ended,
                "seed_seconds": round(time.monotonic() - started, 1),
            }
            if arm.arm != "control":
                c = compare(arm, control)
                row.update(
                    difference=c.difference, difference_interval=c.interval, p=c.test.p_value
                )
            rows.append(row)
            print(_line(row), flush=True)
        if args.output:  # after every seed: a long run that stops keeps what it measured
            args.output.write_text(json.dumps(rows, indent=2))
    print(_pooled(rows))
    return 0


def _pct(value: float | None, interval: Any = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.1%}"
    if interval and interval[0] is not None:
        text += f" ({interval[0]:.1%} to {interval[1]:.1%})"
    return text


def _line(row: dict[str, Any]) -> str:
    rate = _pct(row["outcome_rate"], row["outcome_interval"])
    parts = [
        f"seed {row['seed']} {row['arm']:<8}",
        f"outcome {row['outcomes']}/{row['ended']} {rate}",
    ]
    if "difference" in row:
        low, high = row["difference_interval"]
        parts.append(
            f"vs pi0 {row['difference'] * 100:+.1f} pp ({low * 100:+.1f} to {high * 100:+.1f}), "
            f"p = {row['p']:.2f}"
        )
    accepted = row["accepted"] / row["answered"] if row["answered"] else None
    parts.append(f"accepted {_pct(accepted, row['acceptance_interval'])}")
    if row["score"] is not None:
        low, high = row["score_interval"]
        interval = "" if math.isnan(low) else f" ({low:+.3f} to {high:+.3f})"
        parts.append(f"score {row['score']:+.3f}{interval}")
    if row["check_gain"] is not None:
        low, high = row["check_gain_interval"]
        gain = f"check gain {row['check_gain']:+.3f}"
        if low is not None:
            gain += f" ({low:+.3f} to {high:+.3f})"
        parts.append(gain)
    if row["estimate_dr"] is not None:
        parts.append(f"DR estimate {row['estimate_dr']:.1%}")
    if row["improve_pairs"] is not None:
        parts.append(f"pairs {row['improve_pairs']}")
    if row["iteration_seconds"] is not None:
        parts.append(f"iteration {row['iteration_seconds']:.0f} s")
    return "; ".join(parts)


def _pooled(rows: list[dict[str, Any]]) -> str:
    from services.experiments.report import ArmResult, compare

    arms: dict[str, ArmResult] = {}
    for row in rows:
        pooled = arms.setdefault(row["arm"], ArmResult(row["arm"], row["arm"], 0, 0, 0))
        arms[row["arm"]] = dataclasses.replace(
            pooled, ended=pooled.ended + row["ended"], outcomes=pooled.outcomes + row["outcomes"]
        )
    lines = ["pooled over seeds:"]
    control = arms.get("control")
    for name, arm in arms.items():
        line = f"  {name:<8} {arm.outcomes}/{arm.ended} {_pct(arm.outcome_rate, arm.interval)}"
        if control is not None and name != "control":
            c = compare(arm, control)
            low, high = c.interval
            line += (
                f"; vs pi0 {c.difference * 100:+.1f} pp ({low * 100:+.1f} to {high * 100:+.1f}),"
                f" p = {c.test.p_value:.2f}"
            )
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
