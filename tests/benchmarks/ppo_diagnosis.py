"""Why does (or doesn't) one PPO iteration improve the policy at demo scale? Separate the reward
from the optimiser by running the demo's PPO against a reward we know is right.

The simulator can score a reply the way its customers react to it (`Scenario.score`: the
reply's direct effect on the outcome log-odds). This script runs our PPO from pi_0 on simulated
conversation states, once per `--reward`:

* `oracle`: the simulator's score itself, the best a learned Q could ever be;
* `q:DIR`: a fitted Q (e.g. the demo's `artifacts/iterations/<id>/fit_q`), as the demo does;
* `qfit:N`: a head Q fitted here on N simulated conversations in which the rep wrote every
  message alone (a business's chat history: cheap, and its actions vary in quality), to see
  how Q's ranking of replies grows with data;

then samples replies from pi_0 and from the result on held-out states and prints the simulator
score of both, with 95% intervals, and (for `q:`) how well Q ranks replies the way the simulator
does (Pearson and Spearman correlation on pi_0's samples). If PPO with the oracle moves the
score and PPO with Q does not, the Q is what limits the iteration; if neither moves it, the
optimiser budget (updates, learning rate, KL) is.

Run (alone: it is CPU-bound; about 6 minutes per reward at the demo's PPO settings):

    .venv/bin/python tests/benchmarks/ppo_diagnosis.py --reward oracle --reward q:DIR
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.demo import DemoConfig, ScoreSummary, business_prompt
from services.generation.base import AdapterRef, GenerationRequest, SamplingParams
from services.generation.embedded import EmbeddedBackend
from services.policies.bootstrap import PI0_ID
from services.policies.prompt import ChatMessage, Turn
from services.settings import Settings
from services.simulator.runner import simulate_offline
from services.simulator.scenarios import SCENARIOS, Scenario
from workers.learning.configs import PPOConfig
from workers.learning.improve import improve_policy
from workers.pipeline import prompt_messages, state_of


def states(scenario: Scenario, conversations: int, seed: int) -> list[list[ChatMessage]]:
    """The prompt before every business turn of conversations where the rep wrote alone."""
    report = simulate_offline(scenario, conversations, seed, lambda _history: None)
    system = business_prompt(scenario)
    prompts = []
    for record in report.records:
        turns = [Turn(role, text) for role, text in record.transcript]
        for i, turn in enumerate(turns):
            if turn.role == "customer" and i + 1 < len(turns):
                prompts.append(prompt_messages(system, tuple(turns[: i + 1])))
    return prompts


def oracle(scenario: Scenario):  # type: ignore[no-untyped-def]
    def reward(batch: Sequence[list[ChatMessage]], completions: Sequence[str]) -> list[float]:
        out = []
        for messages, text in zip(batch, completions, strict=True):
            _, state = state_of(list(messages))
            out.append(scenario.score(text, [(t.role, t.text) for t in state]))
        return out

    return reward


def q_reward(path: Path, base_model: Path):  # type: ignore[no-untyped-def]
    from workers.learning.q_model import QModel

    q = QModel.load(path, base_model=str(base_model))

    def reward(batch: Sequence[list[ChatMessage]], completions: Sequence[str]) -> list[float]:
        items = [(*state_of(list(p)), c) for p, c in zip(batch, completions, strict=True)]
        return [float(x) for x in q.score(items)]

    return reward


def fit_on_history(
    scenario: Scenario, conversations: int, seed: int, base_model: Path, output_dir: Path
) -> Path:
    """A head Q on `conversations` rep-alone conversations (seeded apart from the states)."""
    from workers.learning.configs import QFitConfig
    from workers.learning.examples import StepExample
    from workers.learning.q_model import fit_q
    from workers.learning.returns import ReturnsConfig

    gamma = ReturnsConfig().gamma
    system = business_prompt(scenario)
    examples = []
    for record in simulate_offline(scenario, conversations, seed + 10_000, lambda _h: None).records:
        turns = [Turn(role, text) for role, text in record.transcript]
        decisions = [i for i, t in enumerate(turns) if t.role == "business"]
        # The outcome absorbs: reward 1 on the last business turn, G = gamma^(turns left).
        n = len(decisions)
        returns = [gamma ** (n - 1 - t) if record.outcome else 0.0 for t in range(n)]
        for step, (i, ret) in enumerate(zip(decisions, returns, strict=True)):
            examples.append(
                StepExample(
                    conversation_id=record.conversation_id,
                    step=step,
                    n_steps=len(decisions),
                    state=tuple(turns[:i]),
                    action=turns[i].text,
                    ret=ret,
                    outcome=int(record.outcome),
                    system=system,
                )
            )
    result = fit_q(examples, None, QFitConfig(kind="head", base_model=str(base_model)), output_dir)
    print(
        f"  Q fitted on {conversations} history conversations ({len(examples)} decisions): "
        f"held-out {result.metrics}"
    )
    return output_dir


def sample(
    backend: EmbeddedBackend, adapter: AdapterRef, prompts: list[list[ChatMessage]], seed: int
) -> list[str]:
    sampling = SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.95, seed=seed)

    def one(messages: list[ChatMessage]) -> str:
        result = backend.generate(GenerationRequest(messages, adapter, sampling), timeout=600)
        return result.completions[0].text

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def ranks(values: list[float]) -> list[float]:
    """Ranks with ties averaged (the simulator score ties often: many replies score 0), so that
    the Pearson correlation of ranks is Spearman's rho."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2
        start = end + 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", action="append", required=True, help="oracle|q:DIR|qfit:N")
    parser.add_argument("--scenario", default="renovation", choices=sorted(SCENARIOS))
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--eval-prompts", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-updates", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--beta", type=float, default=None)
    args = parser.parse_args()

    settings = Settings()
    base = settings.base_model_path
    pi0 = settings.adapters_dir / PI0_ID
    scenario = SCENARIOS[args.scenario]
    ppo = dict(DemoConfig().ppo)
    for key, value in (
        ("num_updates", args.num_updates),
        ("batch_size", args.batch_size),
        ("learning_rate", args.learning_rate),
        ("beta", args.beta),
    ):
        if value is not None:
            ppo[key] = value
    all_prompts = states(scenario, args.conversations, args.seed)
    random.Random(args.seed).shuffle(all_prompts)
    held_out, train = all_prompts[: args.eval_prompts], all_prompts[args.eval_prompts :]
    print(f"{scenario.name}: {len(train)} training states, {len(held_out)} held-out; PPO {ppo}")
    score = oracle(scenario)
    backend = EmbeddedBackend(base, max_batch_size=8, batch_window_ms=30)
    parent = AdapterRef(PI0_ID, str(pi0))
    before = sample(backend, parent, held_out, args.seed)
    before_scores = score(held_out, before)
    print(f"pi0 on held-out states: simulator score {fmt(ScoreSummary.of(before_scores))}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.reward):
            if spec == "oracle":
                reward = score
            elif spec.startswith(("q:", "qfit:")):
                if spec.startswith("qfit:"):
                    path = fit_on_history(
                        scenario, int(spec[5:]), args.seed, base, Path(tmp) / f"q-{i}"
                    )
                else:
                    path = Path(spec[2:])
                reward = q_reward(path, base)
                q = reward(held_out, before)
                print(
                    f"  Q vs simulator score on pi0's samples: Pearson "
                    f"{statistics.correlation(q, before_scores):+.3f}, Spearman "
                    f"{statistics.correlation(ranks(q), ranks(before_scores)):+.3f}"
                )
            else:
                raise SystemExit(f"--reward {spec!r}: use oracle, q:DIR or qfit:N")
            started = time.monotonic()
            result = improve_policy(
                algorithm="ppo",
                base_model=base,
                parent_adapter=pi0,
                prompts=train,
                reward_fn=reward,
                config=PPOConfig(**ppo),
                output_dir=Path(tmp) / f"candidate-{i}",
            )
            seconds = time.monotonic() - started
            candidate = AdapterRef(f"candidate-{i}", str(result.adapter_dir))
            after_scores = score(held_out, sample(backend, candidate, held_out, args.seed))
            m = result.metrics
            diff = [a - b for a, b in zip(after_scores, before_scores, strict=True)]
            print(
                f"reward {spec}: PPO {seconds:.0f}s, reward of samples "
                f"{m['q_mean_first']:+.3f} -> {m['q_mean']:+.3f}, KL to pi0 {m['kl_ref']:.3f}; "
                f"held-out simulator score {fmt(ScoreSummary.of(after_scores))}, "
                f"paired change {fmt(ScoreSummary.of(diff))}"
            )
    backend.close()


def fmt(s: ScoreSummary) -> str:
    if s.n < 2 or math.isnan(s.low):
        return f"{s.mean:+.3f} (n={s.n})"
    return f"{s.mean:+.3f} ({s.low:+.3f} to {s.high:+.3f}, n={s.n})"


if __name__ == "__main__":
    main()
