"""`outcomeloop demo`: the whole product on the embedded default, end to end.

Simulated customers and business reps (services/simulator) talk through the real HTTP API,
served in this process on SQLite with the default model on CPU:

1. prepare the model and pi_0 (if needed);
2. simulated traffic through pi_0;
3. for each iteration: returns -> Q -> PPO -> candidate, approved automatically (said so),
   then an A/B experiment pi_i vs pi_{i+1} on more simulated traffic;
4. a report per arm (conversations, outcome rate with a 95% interval, accepted / edited /
   rejected) and the Q-fit metrics per iteration: a table here and a self-contained HTML file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from services.app import create_app
from services.db import make_engine, make_session_factory, session_scope
from services.experiments import repository as experiments_repository
from services.experiments.report import ArmResult, experiment_results
from services.experiments.service import ArmSpec, create_experiment, stop_experiment
from services.experiments.statistics import sample_size_per_arm
from services.generation.base import AdapterRef, GenerationBackend, SamplingParams
from services.generation.factory import build_backend
from services.iterations import service as iterations
from services.iterations.models import Step
from services.iterations.schemas import parse_iteration_request
from services.migrate import upgrade
from services.policies import repository as policies_repository
from services.policies.bootstrap import PI0_ID, prepare
from services.policies.prompt import system_prompt
from services.settings import Settings
from services.simulator.paired import PairedComparison, ServedPolicy, compare_paired
from services.simulator.runner import ConversationRecord, run_conversations, simulate_offline
from services.simulator.scenarios import SCENARIOS, Scenario
from services.tenants.models import Role
from services.tenants.service import create_api_key

BUSINESS = "demo-business"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. The defaults finish within 20 minutes on 2 CPU cores (measured: 14.1 and
    15.1 min; README, "What one iteration achieves at demo scale")."""

    conversations: int = 32  # per traffic phase (pi_0 alone, then each A/B test)
    iterations: int = 1
    seed: int = 0
    scenario: str = "renovation"
    # Simulated conversations in flight. More than `batch_size`, so that a full batch is waiting
    # whenever the model frees up (with lanes == batch size, lanes fall into two alternating
    # half-full batches).
    concurrency: int = 16
    batch_size: int = 8  # the embedded backend's largest generation batch
    max_new_tokens: int = 40
    temperature: float = 0.8
    # The default kind, by evidence: on the simulator's own reply scores the lexical Q ranks
    # replies at 0.70 against the head's 0.27 (README, "Which Q"), and it fits in seconds.
    q_kind: str = "lexical"
    ppo: dict[str, Any] = field(
        default_factory=lambda: {
            "num_updates": 6,
            "batch_size": 8,
            "minibatch_size": 4,
            "n_ppo_epochs": 2,
            "max_new_tokens": 40,
            "learning_rate": 1e-4,
            "beta": 0.05,
        }
    )
    # The same simulated customers under pi_i and pi_{i+1} after each A/B (simulator only;
    # services/simulator/paired.py). 0: none.
    paired_customers: int = 32
    max_prompts: int = 64  # PPO's prompts: states of the logged decisions
    # When set, each A/B phase is sized by a power calculation to detect this lift over the
    # rate pi_0 achieved in the first phase (two-sided 5%, power 80%); else `conversations`.
    target_lift: float | None = None
    quick: bool = False

    @classmethod
    def full_config(cls, seed: int = 0, scenario: str = "renovation") -> DemoConfig:
        """Sizes that can show a lift: 96 conversations of pi_0 to learn from, PPO on 256
        samples, each A/B sized by power for +10 points over pi_0's rate (about 290 per arm
        at 20%), and 120 paired simulated customers; 16 rows decoded together (the engine's
        throughput there is 1.5x that at 8). Its wall time is stated when the A/B's size is
        known (README, "The demo at full size")."""
        return cls(
            conversations=96,
            iterations=1,
            seed=seed,
            scenario=scenario,
            concurrency=24,
            batch_size=16,
            ppo={
                "num_updates": 16,
                "batch_size": 16,
                "minibatch_size": 8,
                "n_ppo_epochs": 2,
                "max_new_tokens": 40,
                # the budget and rate at which PPO moved the policy where a good reward
                # pointed (README, "What one iteration achieves at demo scale")
                "learning_rate": 2e-4,
                "beta": 0.05,
            },
            paired_customers=120,
            max_prompts=256,
            target_lift=0.10,
        )

    @classmethod
    def quick_config(cls, seed: int = 0, scenario: str = "renovation") -> DemoConfig:
        """Tiny sizes: every stage runs, nothing is measured (for CI and a first look)."""
        return cls(
            conversations=6,
            iterations=1,
            seed=seed,
            scenario=scenario,
            concurrency=6,
            batch_size=6,
            max_new_tokens=16,
            paired_customers=4,
            ppo={
                "num_updates": 1,
                "batch_size": 2,
                "minibatch_size": 2,
                "n_ppo_epochs": 1,
                "max_new_tokens": 12,
            },
            quick=True,
        )


@dataclass(frozen=True)
class ScoreSummary:
    """Mean of the simulator's score of an arm's suggestions (`Scenario.score`) and its standard
    error: a low-variance view of whether a policy's text moved in the direction the simulated
    customers reward, next to the noisy outcome rate."""

    n: int
    mean: float
    se: float  # nan below two values

    Z95 = 1.959964

    @classmethod
    def of(cls, values: list[float]) -> ScoreSummary:
        n = len(values)
        if n == 0:
            return cls(0, math.nan, math.nan)
        mean = sum(values) / n
        if n == 1:
            return cls(1, mean, math.nan)
        variance = sum((v - mean) ** 2 for v in values) / (n - 1)
        return cls(n, mean, math.sqrt(variance / n))

    @classmethod
    def clustered(cls, groups: list[list[float]]) -> ScoreSummary:
        """The mean over every value, with a standard error that treats each group (a
        conversation's suggestions, which share a customer) as the independent unit: the
        cluster-robust variance of a ratio mean, G / (G - 1) * sum_g (S_g - mean n_g)^2 / N^2
        (sums S_g and sizes n_g of the G non-empty groups, N values in all)."""
        groups = [g for g in groups if g]
        n = sum(len(g) for g in groups)
        if n == 0:
            return cls(0, math.nan, math.nan)
        mean = sum(sum(g) for g in groups) / n
        if len(groups) < 2:
            return cls(n, mean, math.nan)
        spread = sum((sum(g) - mean * len(g)) ** 2 for g in groups)
        k = len(groups)
        return cls(n, mean, math.sqrt(k / (k - 1) * spread) / n)

    @property
    def low(self) -> float:
        """Lower end of the normal 95% interval of the mean."""
        return self.mean - self.Z95 * self.se

    @property
    def high(self) -> float:
        return self.mean + self.Z95 * self.se


@dataclass
class Phase:
    """One traffic phase: an experiment, what its arms achieved and the simulator's score of
    each arm's suggestions (keyed by arm name)."""

    name: str
    experiment_id: str
    arms: list[ArmResult]
    seconds: float
    scores: dict[str, ScoreSummary] = field(default_factory=dict)


@dataclass(frozen=True)
class ScenarioCheck:
    """Does a Q rank replies as the simulator does? Over the candidate check's sampled replies
    (K from pi_i and K from pi_{i+1} at each held-out state), the correlation of Q with
    `Scenario.score` within states (both centred on their state's mean), with a 95% interval
    that resamples conversations. For the check Q and for the Q that PPO optimised."""

    states: int
    replies: int
    check_q: tuple[float | None, float | None, float | None]  # (corr, lo, hi)
    ppo_q: tuple[float | None, float | None, float | None]


@dataclass
class IterationSummary:
    iteration_id: str
    parent: str
    candidate: str | None
    status: str
    metrics: dict[str, Any]
    seconds: float
    scenario_check: ScenarioCheck | None = None


def scenario_check(samples: Path, scenario: Scenario, n_boot: int = 1000) -> ScenarioCheck | None:
    """ScenarioCheck over the candidate check's samples.jsonl (None when it has none)."""
    import numpy as np

    from workers.learning.held_out import (
        conversation_resample_weights,
        percentile_interval,
        weighted_corr_rows,
    )

    groups: list[str] = []
    columns: dict[str, list[float]] = {"score": [], "q_check": [], "q_ppo": []}
    states = 0
    for line in samples.read_text().splitlines() if samples.exists() else []:
        record = json.loads(line)
        history = [(role, text) for role, text in record["state"]]
        replies = [r for rs in record["replies"].values() for r in rs]
        if len(replies) < 2:
            continue
        states += 1
        values = {
            "score": [scenario.score(r["text"], history) for r in replies],
            "q_check": [float(r["q_check"]) for r in replies],
            "q_ppo": [float(r["q_ppo"]) if r["q_ppo"] is not None else 0.0 for r in replies],
        }
        for name, column in values.items():
            mean = sum(column) / len(column)
            columns[name].extend(v - mean for v in column)
        groups.extend([record["conversation_id"]] * len(replies))
    if not groups:
        return None
    weights = np.vstack(
        [np.ones((1, len(groups))), conversation_resample_weights(groups, n_boot, seed=0)]
    )
    score = np.asarray(columns["score"])

    def corr(name: str) -> tuple[float | None, float | None, float | None]:
        rows = weighted_corr_rows(weights, np.asarray(columns[name]), score)
        lo, hi = percentile_interval(rows[1:])
        return (float(rows[0]) if np.isfinite(rows[0]) else None, lo, hi)

    return ScenarioCheck(states, len(groups), corr("q_check"), corr("q_ppo"))


@dataclass
class DemoResult:
    config: DemoConfig
    scenario: Scenario
    phases: list[Phase]
    iterations: list[IterationSummary]
    reference_rates: dict[str, float]
    seconds: float
    store: str
    notes: list[str]
    paired: list[PairedComparison] = field(default_factory=list)


def business_prompt(scenario: Scenario) -> str:
    return (
        f"You write the next chat message of a business. {scenario.description} "
        "Ask about the customer's needs, answer their questions directly, stay polite and "
        "brief (one or two sentences), and propose a concrete next step when they are ready."
    )


@contextmanager
def serve_in_thread(settings: Settings, backend: GenerationBackend | None = None) -> Iterator[str]:
    """Run the real API under uvicorn in a background thread; yield its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(settings, backend=backend)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _traffic(
    base_url: str,
    key: str,
    scenario: Scenario,
    config: DemoConfig,
    seed: int,
    on_done: Callable[[], None],
) -> list[ConversationRecord]:
    """`config.conversations` simulated conversations, `config.concurrency` at a time."""
    lanes = max(1, min(config.concurrency, config.conversations))
    sizes = [
        config.conversations // lanes + (i < config.conversations % lanes) for i in range(lanes)
    ]
    limits = httpx.Limits(max_connections=lanes * 2)
    with httpx.Client(base_url=base_url, timeout=600, limits=limits) as http:

        def lane(i: int) -> list[ConversationRecord]:
            report = run_conversations(
                http, key, scenario, sizes[i], seed * 1000 + i, progress=lambda _d, _n: on_done()
            )
            return list(report.records)

        with ThreadPoolExecutor(lanes) as pool:
            return [r for records in pool.map(lane, range(lanes)) for r in records]


def prepare_world(
    settings: Settings, config: DemoConfig, workdir: Path, status: Callable[[str], None]
) -> tuple[Settings, Any, str, str]:
    """A fresh SQLite store and artifacts in `workdir`, the model and pi_0 prepared, the demo
    business with its key, pi_0 serving it alone: (settings, session factory, business key,
    the experiment serving pi_0)."""
    scenario = SCENARIOS[config.scenario]
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    demo_settings = settings.model_copy(
        update={
            "data_dir": workdir,
            "database_url": f"sqlite:///{workdir / 'demo.sqlite3'}",
            "base_model": settings.base_model_path,
            "generation_backend": "embedded",
            "task_runner": "inline",
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "on_backend_error": "abstain",
            "generation_timeout_s": 120.0,
            "embedded_max_batch": config.batch_size,
            "embedded_batch_window_ms": 30.0,
        }
    )
    upgrade(demo_settings.sqlalchemy_url)
    factory = make_session_factory(make_engine(demo_settings.sqlalchemy_url))
    status("preparing the default model and pi_0")
    # The model and pi_0's adapter are shared with the main data dir: converted once.
    shared = settings.model_copy(update={"base_model": settings.base_model})
    prepare(shared, factory, on_step=status)
    with session_scope(factory) as session:
        from services.tenants.service import ensure_business

        business, _ = ensure_business(session, business_id=BUSINESS, name="Demo business")
        business.system_prompt = business_prompt(scenario)
        key = create_api_key(session, role=Role.BUSINESS, business_id=BUSINESS, label="demo")
        default = experiments_repository.running_for_scope(session, scope="*")
        if default is not None:
            stop_experiment(session, experiment_id=default.id)
        first = create_experiment(
            session, name="pi0 alone", business_id=BUSINESS, arms=[ArmSpec("pi0", PI0_ID, 1.0)]
        )
        experiment_id = first.id
    return demo_settings, factory, key, experiment_id


def run_demo(
    settings: Settings,
    config: DemoConfig,
    *,
    workdir: Path,
    status: Callable[[str], None],
    progress: Callable[[str, float], None],
) -> DemoResult:
    """Run the demo in `workdir` (a fresh SQLite store and artifacts) with `settings`' model."""
    started = time.monotonic()
    scenario = SCENARIOS[config.scenario]
    demo_settings, factory, key, experiment_id = prepare_world(settings, config, workdir, status)
    reference = {
        "rep alone (no suggestions)": simulate_offline(
            scenario, 400, config.seed, lambda _history: None
        ).outcome_rate
    }
    phases: list[Phase] = []
    summaries: list[IterationSummary] = []
    paired: list[PairedComparison] = []
    notes: list[str] = []
    parent = PI0_ID
    # One backend for the API and the paired comparison (one model in memory, one engine).
    backend = build_backend(demo_settings)
    with serve_in_thread(demo_settings, backend) as base_url:
        phases.append(
            traffic_phase(
                base_url, key, scenario, config, factory, experiment_id, "pi0", 0, status, progress
            )
        )
        ab_size = config.conversations
        if config.target_lift is not None:
            ab_size, note = _powered_size(config, phases[0])
            notes.append(note)
            status(note)
        for number in range(1, config.iterations + 1):
            summary = run_iteration(
                demo_settings, factory, config, parent, number, status, progress, notes
            )
            summaries.append(summary)
            if summary.candidate is None or summary.status != "succeeded":
                notes.append(f"iteration {number} stopped: {summary.status}")
                break
            notes.append(
                f"iteration {number}: candidate {summary.candidate} was approved automatically "
                "(the demo plays the operator; in production a person approves)"
            )
            with session_scope(factory) as session:
                it = iterations.get_iteration(session, iteration_id=summary.iteration_id)
                experiment_id = it.experiment_id or ""
            phases.append(
                traffic_phase(
                    base_url,
                    key,
                    scenario,
                    dataclasses.replace(config, conversations=ab_size),
                    factory,
                    experiment_id,
                    f"A/B {parent} vs {summary.candidate}",
                    number,
                    status,
                    progress,
                )
            )
            if config.paired_customers:
                paired.append(
                    _paired(
                        backend, demo_settings, factory, config, parent, summary.candidate, number
                    )
                )
                status(f"paired (simulator only): {paired[-1].seconds:.0f}s")
            parent = summary.candidate
    backend.close()
    return DemoResult(
        config=config,
        scenario=scenario,
        phases=phases,
        iterations=summaries,
        reference_rates=reference,
        seconds=time.monotonic() - started,
        store=demo_settings.sqlalchemy_url,
        notes=notes,
        paired=paired,
    )


def _powered_size(config: DemoConfig, first: Phase) -> tuple[int, str]:
    """The A/B's conversations for `config.target_lift` over the rate pi_0 reached in the first
    phase (clipped to 5%..60%, where a lift of 10 points stays meaningful), and a note with
    the expected wall time at the first phase's pace."""
    assert config.target_lift is not None
    arm = first.arms[0]
    base = min(max(arm.outcome_rate, 0.05), 0.6)
    per_arm = sample_size_per_arm(base, config.target_lift)
    total = 2 * per_arm
    pace = first.seconds / max(config.conversations, 1)
    return total, (
        f"A/B sized by power: {per_arm} conversations per arm to detect {base:.0%} -> "
        f"{base + config.target_lift:.0%} (two-sided 5%, power 80%; pi_0 reached "
        f"{arm.outcome_rate:.0%} of {arm.ended}); {total} conversations, expected "
        f"{total * pace / 60:.0f} min at the first phase's pace"
    )


def _paired(
    backend: GenerationBackend,
    settings: Settings,
    factory: Any,
    config: DemoConfig,
    first: str,
    second: str,
    number: int,
) -> PairedComparison:
    """pi_i and pi_{i+1} on the same simulated customers, served as the API serves them."""
    scenario = SCENARIOS[config.scenario]
    sampling = SamplingParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
    )
    system = system_prompt(
        business_name="Demo business",
        business_prompt=business_prompt(scenario),
        persona_instruction=None,
    )
    policies = []
    with session_scope(factory) as session:
        for policy_id in (first, second):
            policy = policies_repository.get_policy(session, policy_id=policy_id)
            assert policy is not None
            adapter = AdapterRef(policy.id, policy.adapter_uri)
            policies.append((policy_id, ServedPolicy(backend, adapter, system, sampling)))
    return compare_paired(
        scenario,
        (policies[0], policies[1]),
        n=config.paired_customers,
        seed=config.seed + 104729 * number,  # customers no traffic phase met
        concurrency=config.concurrency,
    )


def traffic_phase(
    base_url: str,
    key: str,
    scenario: Scenario,
    config: DemoConfig,
    factory: Any,
    experiment_id: str,
    name: str,
    index: int,
    status: Callable[[str], None],
    progress: Callable[[str, float], None],
) -> Phase:
    status(f"simulated traffic: {name}")
    started = time.monotonic()
    done = [0]
    lock = threading.Lock()

    def tick() -> None:
        with lock:
            done[0] += 1
            progress(f"traffic: {name}", done[0] / config.conversations)

    records = _traffic(base_url, key, scenario, config, config.seed + 7919 * index, tick)
    with session_scope(factory) as session:
        arms = experiment_results(session, experiment_id=experiment_id)
    by_arm: dict[str, list[list[float]]] = {}
    for record in records:
        if record.arm is not None:
            by_arm.setdefault(record.arm, []).append(list(record.suggestion_scores))
    # A conversation's suggestions share one customer: the conversation is the unit.
    scores = {arm: ScoreSummary.clustered(groups) for arm, groups in by_arm.items()}
    return Phase(name, experiment_id, arms, time.monotonic() - started, scores)


def run_iteration(
    settings: Settings,
    factory: Any,
    config: DemoConfig,
    parent: str,
    number: int,
    status: Callable[[str], None],
    progress: Callable[[str, float], None],
    notes: list[str],
    *,
    algorithm: str = "ppo",
    hyperparameters: dict[str, Any] | None = None,
    deploy: bool = True,
) -> IterationSummary:
    """One iteration of `parent` in this process (PPO at the config's settings unless told
    otherwise), the demo playing the operator: a failed Q gate is overridden (noted), and with
    `deploy` the candidate is approved and its A/B experiment started."""
    from workers.runner import BlockingRunner

    def heartbeat(iteration_id: str) -> None:
        with session_scope(factory) as session:
            it = iterations.get_iteration(session, iteration_id=iteration_id)
            progress(f"iteration {number}: {it.current_step or it.status}", it.progress)

    # The demo runs every step in this process, reporting progress while it waits.
    runner = BlockingRunner(settings, factory, heartbeat=heartbeat)
    status(f"iteration {number}: returns -> Q -> {algorithm.upper()} on {parent}")
    started = time.monotonic()
    request = parse_iteration_request(
        {
            "algorithm": algorithm,
            "hyperparameters": {
                **(config.ppo if hyperparameters is None else hyperparameters),
                "q": {"kind": config.q_kind, **({"max_length": 128} if config.quick else {})},
            },
            "data": {
                "business_id": BUSINESS,
                "max_prompts": config.max_prompts,
                "eval_fraction": 0.25,
                # 2 x 2 replies per held-out decision: about 2.5 minutes of CPU generation.
                "check_samples": 2,
            },
            "parent_policy_id": parent,
        }
    )
    with session_scope(factory) as session:
        iteration_id = iterations.create_iteration(
            session, settings=settings, request=request, trigger="demo"
        ).id
    runner.submit(iteration_id, Step.RETURNS)
    resume: Step | None = None
    with session_scope(factory) as session:
        it = iterations.get_iteration(session, iteration_id=iteration_id)
        if it.status == "failed" and it.current_step == Step.EVALUATE_Q.value:
            notes.append(
                f"iteration {number}: {it.error}. The demo overrides the Q gate to show the "
                "whole loop; an operator would decide (retry with override_gate)"
            )
            resume = iterations.retry(session, iteration_id=iteration_id, override_gate=True)
    if resume is not None:
        status(f"iteration {number}: Q gate failed; overridden by the demo (see notes)")
        runner.submit(iteration_id, resume)
    with session_scope(factory) as session:
        it = iterations.get_iteration(session, iteration_id=iteration_id)
        if it.status == "awaiting_approval" and deploy:
            iterations.approve(session, iteration_id=iteration_id)
            approved = True
        else:
            approved = False
    if approved:
        status(f"iteration {number}: approved automatically (demo) -> A/B experiment")
        runner.submit(iteration_id, Step.DEPLOY)
    with session_scope(factory) as session:
        it = iterations.get_iteration(session, iteration_id=iteration_id)
        check = next((s.result for s in it.steps if s.step == Step.CHECK.value), None) or {}
        return IterationSummary(
            iteration_id=it.id,
            parent=parent,
            candidate=it.candidate_policy_id,
            status=it.status if not it.error else f"{it.status}: {it.error}",
            metrics=dict(it.metrics),
            seconds=time.monotonic() - started,
            scenario_check=(
                scenario_check(Path(check["dir"]) / "samples.jsonl", SCENARIOS[config.scenario])
                if "dir" in check
                else None
            ),
        )
