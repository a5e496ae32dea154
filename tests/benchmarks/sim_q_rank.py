"""Does Q rank replies the way the simulator's customers do? Q kinds on a business's chat history.

    python -m tests.benchmarks.sim_q_rank [--scenario renovation] [--train 150] [--held 80]
        [--kinds lexical,head] [--seed 0]

Simulates --train + --held conversations in which the rep wrote every message alone (a chat
history: its replies vary in quality), turns them into decisions as the pipeline does (the
outcome absorbs: G = gamma^(business turns left) on success, else 0), fits each Q kind with
fit_q on the training conversations and evaluates on the held-out ones. Beside fit_q's held-out
report (AUC, and the ranking measure corr(Q - V, G - V) with the kind's own V), the simulator's
ground truth: `Scenario.score(a, s)`, a reply's direct effect on the customer's outcome log-odds.

- `score corr`: Pearson correlation of Q(s, a) with score(a, s) over held-out decisions;
- `contrast corr`: each held-out decision gets the reply a' of a decision in another held-out
  conversation; the correlation of Q(s, a) - Q(s, a') with score(a, s) - score(a', s). Zero for
  a Q that ignores the reply, whatever it knows about the state: what PPO needs.

Every correlation has a 95% interval from resampling held-out conversations. Fit wall and CPU
seconds are those of fit_q (which also scores the held-out decisions).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.demo import business_prompt
from services.policies.prompt import Turn
from services.simulator.runner import simulate_offline
from services.simulator.scenarios import SCENARIOS, Scenario
from tests.benchmarks.pfg_q_eval import interval, swapped_replies
from workers.learning.configs import QFitConfig
from workers.learning.examples import StepExample
from workers.learning.held_out import (
    conversation_resample_weights,
    percentile_interval,
    weighted_corr_rows,
)
from workers.learning.q_model import fit_q
from workers.learning.returns import ReturnsConfig


def history_examples(scenario: Scenario, conversations: int, seed: int) -> list[StepExample]:
    """Every business turn of rep-alone conversations as a decision, returns as the pipeline's."""
    gamma = ReturnsConfig().gamma
    system = business_prompt(scenario)
    examples = []
    for record in simulate_offline(scenario, conversations, seed, lambda _h: None).records:
        turns = [Turn(role, text) for role, text in record.transcript]
        decisions = [i for i, t in enumerate(turns) if t.role == "business"]
        n = len(decisions)
        for step, i in enumerate(decisions):
            examples.append(
                StepExample(
                    conversation_id=f"{seed}-{record.conversation_id}",
                    step=step,
                    n_steps=n,
                    state=tuple(turns[:i]),
                    action=turns[i].text,
                    ret=gamma ** (n - 1 - step) if record.outcome else 0.0,
                    outcome=int(record.outcome),
                    system=system,
                )
            )
    return examples


def clustered_corr(
    x: Sequence[float], y: Sequence[float], examples: Sequence[StepExample], n_boot: int, seed: int
) -> tuple[float, float | None, float | None]:
    """Pearson correlation, with a 95% interval from resampling conversations."""
    w = np.vstack(
        [
            np.ones((1, len(examples))),
            conversation_resample_weights([e.conversation_id for e in examples], n_boot, seed),
        ]
    )
    rows = weighted_corr_rows(w, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return (float(rows[0]), *percentile_interval(rows[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="renovation")
    parser.add_argument("--train", type=int, default=150, help="training conversations")
    parser.add_argument("--held", type=int, default=80, help="held-out conversations")
    parser.add_argument("--kinds", default="lexical,head")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", type=Path, help="default: the prepared SmolLM2-135M")
    args = parser.parse_args()

    scenario = SCENARIOS[args.scenario]
    kinds = [k for k in args.kinds.split(",") if k]
    if args.base_model is None and set(kinds) - {"lexical"}:
        from tests.real_model import prepared_smollm2

        args.base_model = prepared_smollm2()
    train = history_examples(scenario, args.train, args.seed + 10_000)
    held = history_examples(scenario, args.held, args.seed + 20_000)
    swapped = swapped_replies(held, args.seed)
    score = [scenario.score(e.action, [(t.role, t.text) for t in e.state]) for e in held]
    score_swapped = [scenario.score(e.action, [(t.role, t.text) for t in e.state]) for e in swapped]
    rate = np.mean([e.outcome for e in held if e.step == 0])
    print(
        f"{args.scenario}: {len(train)} training decisions ({args.train} conversations), "
        f"{len(held)} held-out ({args.held} conversations, outcome rate {rate:.2f})",
        flush=True,
    )
    header = (
        f"{'kind':<10} {'AUC first half':>20} {'AUC all':>20} {'rank corr(Q-V, G-V)':>20} "
        f"{'score corr':>20} {'contrast corr':>20} {'fit wall s':>10} {'fit CPU s':>10}"
    )
    lines = []
    for kind in kinds:
        config = QFitConfig(
            kind=kind,  # type: ignore[arg-type]
            base_model=str(args.base_model or ""),
            max_length=args.max_length,
            eval_bootstrap=args.bootstrap,
            seed=args.seed,
        )
        wall, cpu = time.monotonic(), time.process_time()
        result = fit_q(train, held, config, Path(tempfile.mkdtemp(prefix=f"sim-q-{kind}-")))
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        q = result.model.score([(e.system, e.state, e.action) for e in held])
        q_swapped = result.model.score([(e.system, e.state, e.action) for e in swapped])
        direct = clustered_corr(q, score, held, args.bootstrap, args.seed)
        contrast = clustered_corr(
            [a - b for a, b in zip(q, q_swapped, strict=True)],
            [a - b for a, b in zip(score, score_swapped, strict=True)],
            held,
            args.bootstrap,
            args.seed,
        )
        m = result.metrics
        first, every, rank = m["first_half"], m["all"], m["rank"]
        lines.append(
            f"{kind:<10} {interval(first['auc'], first['auc_lo'], first['auc_hi']):>20} "
            f"{interval(every['auc'], every['auc_lo'], every['auc_hi']):>20} "
            f"{interval(rank['corr'], rank['corr_lo'], rank['corr_hi']):>20} "
            f"{interval(*direct):>20} {interval(*contrast):>20} {wall:>10.1f} {cpu:>10.1f}"
        )
        print(lines[-1], flush=True)
    print(f"\n{header}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
