"""What one simulated data window gives an iteration to learn from, by source.

Plays N simulated conversations through the real API on the embedded default (pi_0 serving with
exploration epsilon), then prints the decisions per source that an iteration of pi_0 uses, the
reasons the rest are excluded, and the effective sample size under both off-policy estimators.
With --old-tree (a checkout of an earlier commit), the same window is also read by that
commit's dataset builder, in a subprocess, for a before/after comparison.

    python tests/benchmarks/decision_sources.py --conversations 32 --epsilon 0.2 --seed 0 \
        [--old-tree /tmp/old] [--workdir /tmp/window]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OLD_READER = r"""
import json, sys
sys.path.insert(0, sys.argv[3])  # the old tree before the installed (editable) one
from collections import Counter
from services.db import make_engine, make_session_factory, session_scope, utcnow
from services.iterations.dataset import build_examples
from workers.learning.returns import ReturnsConfig
url, policy = sys.argv[1], sys.argv[2]
factory = make_session_factory(make_engine(url))
out = {}
for arms in ("policy", "all"):
    with session_scope(factory) as session:
        examples, stats = build_examples(
            session, config=ReturnsConfig(arms=arms), policy_id=policy, cutoff=utcnow()
        )
    after = sum(1 for e in examples if e.outcome and e.ret == 0)
    out[arms] = {
        "decisions": stats.decisions,
        "examples": len(examples),
        "logged": stats.logged,
        "unlogged": stats.unlogged,
        "abstained": stats.abstained,
        "off_policy": stats.off_policy,
        "outcome_but_zero_return": after,
        "max_return": max((e.ret for e in examples), default=0.0),
        "returns_above_1": sum(1 for e in examples if e.ret > 1.0),
    }
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--epsilon", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenario", default="renovation")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/outcomeloop-window"))
    parser.add_argument("--old-tree", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="Read an existing window only.")
    args = parser.parse_args()

    from services.db import make_engine, make_session_factory, session_scope, utcnow
    from services.demo import BUSINESS, DemoConfig, _traffic, business_prompt, serve_in_thread
    from services.experiments import repository as experiments_repository
    from services.experiments.service import ArmSpec, create_experiment, stop_experiment
    from services.iterations.dataset import DatasetStats, iter_decisions
    from services.migrate import upgrade
    from services.policies.bootstrap import PI0_ID, prepare
    from services.settings import get_settings
    from services.simulator.scenarios import SCENARIOS
    from services.tenants.models import Role
    from services.tenants.service import create_api_key, ensure_business
    from workers.learning.returns import DECISION_SOURCES, ReturnsConfig

    settings = get_settings()
    url = f"sqlite:///{args.workdir / 'window.sqlite3'}"
    window = settings.model_copy(
        update={
            "data_dir": args.workdir,
            "database_url": url,
            "base_model": settings.base_model_path,
            "task_runner": "inline",
            "max_new_tokens": 40,
            "temperature": 0.8,
            "on_backend_error": "abstain",
            "generation_timeout_s": 120.0,
            "embedded_max_batch": 8,
            "embedded_batch_window_ms": 30.0,
        }
    )
    scenario = SCENARIOS[args.scenario]
    if not args.reuse:
        args.workdir.mkdir(parents=True, exist_ok=True)
        (args.workdir / "window.sqlite3").unlink(missing_ok=True)
        upgrade(url)
        factory = make_session_factory(make_engine(url))
        prepare(settings.model_copy(update={"base_model": settings.base_model}), factory)
        with session_scope(factory) as session:
            business, _ = ensure_business(session, business_id=BUSINESS, name="Demo business")
            business.system_prompt = business_prompt(scenario)
            key = create_api_key(session, role=Role.BUSINESS, business_id=BUSINESS)
            default = experiments_repository.running_for_scope(session, scope="*")
            if default is not None:
                stop_experiment(session, experiment_id=default.id)
            create_experiment(
                session,
                name="pi0 exploring",
                business_id=BUSINESS,
                arms=[ArmSpec("pi0", PI0_ID, 1.0)],
                exploration={"epsilon": args.epsilon},
            )
        config = DemoConfig(conversations=args.conversations, seed=args.seed)
        started = time.monotonic()
        with serve_in_thread(window) as base_url:
            records = _traffic(base_url, key, scenario, config, args.seed, lambda: None)
        print(
            f"window: {len(records)} conversations in {time.monotonic() - started:.0f} s, "
            f"{sum(r.outcome for r in records)} outcomes, epsilon {args.epsilon}, "
            f"seed {args.seed}, scenario {args.scenario}"
        )
    factory = make_session_factory(make_engine(url))
    results = {}
    for name, returns in {
        "default (policy + exploration, weighted)": ReturnsConfig(),
        "default, truncated traces": ReturnsConfig(off_policy="truncated"),
        "every source": ReturnsConfig(sources=DECISION_SOURCES),
    }.items():
        stats = DatasetStats()
        with session_scope(factory) as session:
            for _ in iter_decisions(
                session, config=returns, policy_id=PI0_ID, cutoff=utcnow(), stats=stats
            ):
                pass
        results[name] = stats.as_dict()
        print(f"\n== after: {name}")
        print(json.dumps(stats.as_dict(), indent=1))
    if args.old_tree is not None:
        old = subprocess.run(
            [sys.executable, "-c", OLD_READER, url, PI0_ID, str(args.old_tree)],
            capture_output=True,
            text=True,
            check=True,
        )
        print("\n== before (the old dataset builder on the same window)")
        print(json.dumps(json.loads(old.stdout.strip().splitlines()[-1]), indent=1))


if __name__ == "__main__":
    main()
