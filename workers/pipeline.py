"""One iteration step = load ids -> run the learning code -> persist, idempotently.

`run_step` is what a Celery task (or the inline runner) calls. Heavy work happens outside any
database transaction; artifacts are written to a temporary directory and renamed into place,
so a worker killed mid-step leaves nothing half-written and the redelivered step starts clean.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from services.db import session_scope
from services.experiments import repository as experiments_repository
from services.experiments.assignment import unit_interval
from services.experiments.models import GLOBAL_SCOPE
from services.experiments.service import ArmSpec, create_experiment, stop_experiment
from services.iterations import service
from services.iterations.dataset import build_dataset, check_trajectories, preference_data
from services.iterations.models import Iteration, Step
from services.iterations.pipeline_config import PipelineConfig
from services.policies import service as policies
from services.policies.models import PolicyStatus
from services.policies.prompt import ChatMessage, Turn
from services.settings import Settings
from workers.learning.chat import prompt_messages
from workers.learning.config_build import OFFLINE_ALGORITHMS
from workers.learning.examples import StepExample
from workers.learning.improve import Algorithm, OfflineAlgorithm
from workers.learning.preferences import conversation_record
from workers.learning.returns import ReturnsConfig

log = logging.getLogger(__name__)


class StepBusy(Exception):
    """Another worker holds a live lease on this step: try again later."""


class GateFailed(Exception):
    """The Q function is not good enough to improve against."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def step_dir(settings: Settings, iteration_id: str, step: Step) -> Path:
    return settings.artifacts_dir / "iterations" / iteration_id / step.value


def _fresh_dir(final: Path, attempt: int) -> Path:
    tmp = final.with_name(f"{final.name}.tmp-{attempt}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished step's artifacts into place; drop what dead attempts left behind."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for stale in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


# -- examples on disk ---------------------------------------------------------------------------


def write_examples(path: Path, examples: list[StepExample]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for e in examples:
            row = asdict(e)
            row["state"] = [[t.role, t.text] for t in e.state]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_examples(path: Path) -> list[StepExample]:
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            row["state"] = tuple(Turn(role, text) for role, text in row["state"])
            examples.append(StepExample(**row))
    return examples


def state_of(messages: list[ChatMessage]) -> tuple[str | None, tuple[Turn, ...]]:
    """Inverse of prompt_messages, for a reward function that receives chat prompts."""
    system = messages[0].content if messages and messages[0].role == "system" else None
    body = messages[1:] if system is not None else messages
    return system, tuple(
        Turn("customer" if m.role == "user" else "business", m.content) for m in body
    )


# -- the steps ----------------------------------------------------------------------------------


class Context:
    def __init__(
        self,
        factory: sessionmaker[Session],
        settings: Settings,
        iteration: Iteration,
        attempt: int,
        progress: Callable[[float], None],
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.iteration = iteration
        self.attempt = attempt
        self.progress = progress
        self.configs: dict[str, Any] = iteration.configs

    @property
    def pipeline(self) -> PipelineConfig:
        """The iteration's own config, validated again as stored (a row from an older version
        with an unknown key fails here, loudly)."""
        return PipelineConfig(**self.configs["pipeline"])

    def dir(self, step: Step) -> Path:
        return step_dir(self.settings, self.iteration.id, step)

    def result_of(self, step: Step) -> dict[str, Any]:
        with session_scope(self.factory) as session:
            from services.iterations import repository

            row = repository.get_step(session, iteration_id=self.iteration.id, step=step.value)
            if row is None or row.result is None:
                raise RuntimeError(f"step {step.value} has no result yet")
            return dict(row.result)


def step_returns(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    config = ReturnsConfig(**ctx.configs["returns"])
    with session_scope(ctx.factory) as session:
        examples, stats, decisions = build_dataset(
            session,
            config=config,
            policy_id=ctx.iteration.parent_policy_id,
            cutoff=ctx.iteration.data_cutoff,
        )
    if not examples:
        raise RuntimeError(
            f"no training data for {ctx.iteration.parent_policy_id} from sources "
            f"{list(config.sources)}: {stats.conversations} ended conversations in the window, "
            f"{stats.decisions} decisions, by source {stats.by_source}, excluded {stats.excluded}"
        )
    fraction = ctx.pipeline.eval_fraction
    held_out = [e for e in examples if unit_interval("split", e.conversation_id) < fraction]
    train = [e for e in examples if unit_interval("split", e.conversation_id) >= fraction]
    if not held_out or not train:  # tiny data: keep both sides non-empty
        held_out, train = examples[: max(1, len(examples) // 5)], examples[len(examples) // 5 :]
    # PPO's prompts: states pi_i answered (never after an outcome), one per decision state, of
    # the training conversations only: the candidate check samples at held-out states.
    seen: set[tuple[str, tuple[Turn, ...]]] = set()
    prompts = []
    for e in sorted(
        train, key=lambda e: unit_interval("prompts", e.conversation_id, str(len(e.state)))
    ):
        if (e.conversation_id, e.state) in seen or not e.state or e.state[-1].role != "customer":
            continue
        seen.add((e.conversation_id, e.state))
        prompts.append({"system": e.system, "state": [[t.role, t.text] for t in e.state]})
        if len(prompts) >= ctx.pipeline.max_prompts:
            break
    # The candidate check's conversations: held-out ones, every decision of pi_i's serving.
    held_ids = {e.conversation_id for e in held_out}
    chosen = set(
        sorted(held_ids, key=lambda c: unit_interval("check", c))[
            : ctx.pipeline.check_conversations
        ]
    )
    trajectories = check_trajectories([d for d in decisions if d.conversation_id in chosen])
    final = ctx.dir(Step.RETURNS)
    tmp = _fresh_dir(final, ctx.attempt)
    offline: dict[str, int] = {}
    if ctx.iteration.algorithm in OFFLINE_ALGORITHMS:
        # DMPO and DPO learn from the training conversations only, as Q does.
        with session_scope(ctx.factory) as session:
            preferences = preference_data(session, config=config, cutoff=ctx.iteration.data_cutoff)
        train_ids = {e.conversation_id for e in train}
        preferences.conversations = [
            c for c in preferences.conversations if c.conversation_id in train_ids
        ]
        preferences.edits = [e for e in preferences.edits if e.conversation_id in train_ids]
        (tmp / "conversations.jsonl").write_text(
            "".join(json.dumps(conversation_record(c)) + "\n" for c in preferences.conversations)
        )
        (tmp / "edits.jsonl").write_text(
            "".join(json.dumps(e.as_record()) + "\n" for e in preferences.edits)
        )
        offline = preferences.counts()
    (tmp / "check.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trajectories))
    write_examples(tmp / "train.jsonl", train)
    write_examples(tmp / "eval.jsonl", held_out)
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp / "stats.json").write_text(json.dumps(stats.as_dict(), indent=2))
    _publish(tmp, final)
    result = {
        "dir": str(final),
        "train": len(train),
        "train_conversations": len({e.conversation_id for e in train}),
        "eval": len(held_out),
        "prompts": len(prompts),
        "check_decisions": len(trajectories),
        "data": stats.as_dict(),
        **({"preferences": offline} if offline else {}),
    }
    metrics = {f"data_preference_{k}": v for k, v in offline.items()}
    return result, {**stats.flat(), "data_examples": len(examples), **metrics}


def step_fit_q(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    from workers.learning.config_build import q_fit_config
    from workers.learning.held_out import flat_metrics
    from workers.learning.q_model import fit_q

    data = Path(ctx.result_of(Step.RETURNS)["dir"])
    config = q_fit_config(ctx.configs["q"])
    final = ctx.dir(Step.FIT_Q)
    tmp = _fresh_dir(final, ctx.attempt)
    fitted = fit_q(
        read_examples(data / "train.jsonl"),
        read_examples(data / "eval.jsonl"),
        config,
        tmp,
        progress=lambda _what, fraction: ctx.progress(fraction),
    )
    _publish(tmp, final)
    metrics: dict[str, Any] = {"q_n_train": fitted.n_train, "q_seconds": round(fitted.seconds, 2)}
    # q_auc(_lo/_hi), q_mse.., q_auc_first_half.., q_rank_corr(_lo/_hi), q_head_alpha, ...
    metrics.update(flat_metrics(fitted.metrics, fitted.fit))
    return {"dir": str(final), **metrics}, metrics


def step_evaluate_q(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """The gate: Q must rank replies, i.e. the lower bound of the held-out correlation of
    Q - V with G - V must lie above the floor; the AUC is reported beside it, not gated on."""
    from workers.learning.held_out import rank_gate

    fitted = ctx.result_of(Step.FIT_Q)
    floor = ctx.pipeline.rank_floor
    gate = rank_gate(fitted, floor if floor is not None else ctx.settings.q_rank_floor)
    overridden = not gate["passed"] and bool(ctx.iteration.override_gate)
    result: dict[str, Any] = {
        **gate,
        "overridden": overridden,
        "q_auc": fitted.get("q_auc"),  # held-out ROC AUC of Q against the final outcome
        "q_auc_lo": fitted.get("q_auc_lo"),
        "q_auc_hi": fitted.get("q_auc_hi"),
        "q_auc_first_half": fitted.get("q_auc_first_half"),
    }
    if not gate["passed"] and not overridden:
        raise GateFailed(
            f"Q does not rank replies: {gate['reason']} (at or below the floor fails); an "
            "operator may retry with override_gate"
        )
    metrics = {
        "q_gate_passed": gate["passed"],
        "q_gate_overridden": overridden,
        "q_gate_rank_floor": gate["rank_floor"],
    }
    return result, metrics


def step_improve(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    from workers.learning.config_build import improvement_config

    with session_scope(ctx.factory) as session:
        parent = policies.get_policy(session, policy_id=ctx.iteration.parent_policy_id)
        base_model, parent_adapter = Path(parent.base_model), Path(parent.adapter_uri)
    data = Path(ctx.result_of(Step.RETURNS)["dir"])
    improve = dict(ctx.configs["improve"])
    algorithm = improve.pop("algorithm")
    config = improvement_config(algorithm, improve)
    final = ctx.dir(Step.IMPROVE)
    tmp = _fresh_dir(final, ctx.attempt)
    if algorithm in OFFLINE_ALGORITHMS:
        result, extra = _improve_offline(
            ctx, algorithm, config, data, base_model, parent_adapter, tmp
        )
    else:
        result, extra = _improve_against_q(
            ctx, algorithm, config, data, base_model, parent_adapter, tmp
        )
    adapter = final / Path(result.adapter_dir).relative_to(tmp)
    _publish(tmp, final)
    metrics = {f"improve_{k}": v for k, v in result.metrics.items() if isinstance(v, int | float)}
    metrics.update(extra)
    return {"adapter_dir": str(adapter), **metrics}, metrics


def _improve_against_q(
    ctx: Context,
    algorithm: Algorithm,
    config: Any,
    data: Path,
    base_model: Path,
    parent_adapter: Path,
    tmp: Path,
) -> tuple[Any, dict[str, Any]]:
    """PPO, RLOO or GRPO at the training states, with the fitted Q as the reward."""
    from workers.learning.improve import improve_policy
    from workers.learning.q_model import QModel

    q = QModel.load(Path(ctx.result_of(Step.FIT_Q)["dir"]))
    prompts = []
    for line in (data / "prompts.jsonl").read_text().splitlines():
        row = json.loads(line)
        prompts.append(prompt_messages(row["system"], tuple(Turn(r, t) for r, t in row["state"])))

    def reward(batch: Any, completions: Any) -> list[float]:
        items = [(*state_of(list(p)), c) for p, c in zip(batch, completions, strict=True)]
        return [float(x) for x in q.score(items)]

    result = improve_policy(
        algorithm=algorithm,
        base_model=base_model,
        parent_adapter=parent_adapter,
        prompts=prompts,
        reward_fn=reward,
        config=config,
        output_dir=tmp / "adapter",
        progress=lambda _what, fraction: ctx.progress(fraction),
    )
    return result, {}


def _improve_offline(
    ctx: Context,
    algorithm: OfflineAlgorithm,
    config: Any,
    data: Path,
    base_model: Path,
    parent_adapter: Path,
    tmp: Path,
) -> tuple[Any, dict[str, Any]]:
    """DMPO on pairs of the training conversations, or DPO on their edits; Q is not used."""
    from workers.learning.improve import improve_offline
    from workers.learning.preferences import (
        EditPair,
        conversation_from_record,
        pair_conversations,
    )

    def records(name: str) -> list[dict[str, Any]]:
        path = data / name
        if not path.is_file():
            raise RuntimeError(
                f"the returns step wrote no {name}: retry the iteration from returns"
            )
        return [json.loads(line) for line in path.read_text().splitlines()]

    extra: dict[str, Any]
    preferences: list[Any]
    if algorithm == "dmpo":
        conversations = [conversation_from_record(r) for r in records("conversations.jsonl")]
        preferences = pair_conversations(
            conversations,
            opening_similarity=config.opening_similarity,
            max_pairs_per_conversation=config.max_pairs_per_conversation,
        )
        extra = {
            "improve_pairs": len(preferences),
            "improve_pairs_shared_turns": round(
                sum(p.shared_turns for p in preferences) / len(preferences), 3
            )
            if preferences
            else 0.0,
        }
        if not preferences:
            winners = sum(c.outcome for c in conversations)
            raise RuntimeError(
                f"no DMPO pairs: {len(conversations)} training conversations, {winners} with the "
                f"outcome; pairs need a winner and a loser of one business whose openings are at "
                f"least {config.opening_similarity} similar (opening_similarity)"
            )
    else:
        preferences = [EditPair.from_record(r) for r in records("edits.jsonl")]
        extra = {"improve_edits_available": len(preferences)}
    result = improve_offline(
        algorithm=algorithm,
        base_model=base_model,
        parent_adapter=parent_adapter,
        data=preferences,
        config=config,
        output_dir=tmp / "adapter",
        progress=lambda _what, fraction: ctx.progress(fraction),
    )
    return result, extra


def step_check(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """pi_{i+1} against pi_i before traffic (workers/learning/candidate_check.py): the gain in
    Q at held-out states (flagged when its lower bound is not above zero) and the direct and doubly
    robust estimates of the candidate's outcome rate. It informs the operator; it stops nothing."""
    pipeline = ctx.pipeline
    if pipeline.check_samples == 0:
        return {"skipped": "check_samples is 0"}, {"check_skipped": True}
    from workers.learning.candidate_check import (
        CheckDecision,
        CheckSettings,
        CheckUnavailable,
        run_check,
    )
    from workers.learning.config_build import q_fit_config
    from workers.learning.evidence import flat_evidence
    from workers.learning.q_model import QModel

    with session_scope(ctx.factory) as session:
        parent = policies.get_policy(session, policy_id=ctx.iteration.parent_policy_id)
        base_model, parent_adapter = Path(parent.base_model), Path(parent.adapter_uri)
    data = Path(ctx.result_of(Step.RETURNS)["dir"])
    decisions = [
        CheckDecision.from_record(json.loads(line))
        for line in (data / "check.jsonl").read_text().splitlines()
    ]
    if not decisions:
        return {"skipped": "no held-out decisions"}, {"check_skipped": True}
    improve = ctx.configs["improve"]
    if "temperature" not in improve:
        # DMPO and DPO sample nothing: the check samples both policies as they are served.
        if ctx.settings.temperature <= 0:
            return {"skipped": "served greedily: no samples to compare"}, {"check_skipped": True}
        improve = {
            **improve,
            "max_new_tokens": ctx.settings.max_new_tokens,
            "temperature": ctx.settings.temperature,
            "top_p": ctx.settings.top_p,
        }
    returns = ReturnsConfig(**ctx.configs["returns"])
    ppo_q = QModel.load(Path(ctx.result_of(Step.FIT_Q)["dir"]))
    final = ctx.dir(Step.CHECK)
    tmp = _fresh_dir(final, ctx.attempt)
    try:
        result = run_check(
            base_model=base_model,
            parent_adapter=parent_adapter,
            candidate_adapter=Path(ctx.result_of(Step.IMPROVE)["adapter_dir"]),
            decisions=decisions,
            check_examples=read_examples(data / "eval.jsonl"),
            q_config=q_fit_config(ctx.configs["q"]),
            settings=CheckSettings(
                samples=pipeline.check_samples,
                max_new_tokens=int(improve["max_new_tokens"]),
                temperature=float(improve["temperature"]),
                top_p=float(improve.get("top_p", 1.0)),
                clip=returns.importance_clip,
                seed=int(improve.get("seed", 0)),
                device=str(improve.get("device", "auto")),
            ),
            ppo_q=lambda items: ppo_q.score(items),
            output_dir=tmp,
        )
    except CheckUnavailable as exc:
        log.warning("iteration %s: %s", ctx.iteration.id, exc)
        return {"skipped": str(exc)}, {"check_skipped": True}
    _publish(tmp, final)
    metrics: dict[str, Any] = {
        **flat_evidence(result.check, result.rates),
        "check_gain_ppo_q": result.ppo_q_gain,
        "check_seconds": round(result.seconds, 2),
    }
    return {"dir": str(final), **metrics}, metrics


def candidate_policy_id(iteration_id: str) -> str:
    return f"it-{iteration_id[:24]}"


def step_register(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    adapter = ctx.result_of(Step.IMPROVE)["adapter_dir"]
    policy_id = candidate_policy_id(ctx.iteration.id)
    with session_scope(ctx.factory) as session:
        parent = policies.get_policy(session, policy_id=ctx.iteration.parent_policy_id)
        policies.register_policy(
            session,
            policy_id=policy_id,
            base_model=parent.base_model,
            adapter_uri=adapter,
            parent_id=parent.id,
            iteration_id=ctx.iteration.id,
            status=PolicyStatus.CANDIDATE,
            config={**ctx.configs, "metrics": ctx.iteration.metrics},
            description=f"{ctx.iteration.algorithm} on {parent.id}",
        )
        service.set_candidate(session, iteration_id=ctx.iteration.id, policy_id=policy_id)
    return {"policy_id": policy_id}, {}


def step_deploy(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """Approved: pi_{i+1} against pi_i in a fresh A/B experiment for the same scope."""
    candidate = ctx.iteration.candidate_policy_id
    assert candidate is not None
    weight = ctx.pipeline.ab_weight
    with session_scope(ctx.factory) as session:
        policies.transition(session, policy_id=candidate, to=PolicyStatus.APPROVED)
        scope = ctx.iteration.business_id or GLOBAL_SCOPE
        running = experiments_repository.running_for_scope(session, scope=scope)
        if running is not None and running.name == f"iteration {ctx.iteration.id}":
            experiment = running  # a redelivered deploy that already created it
        else:
            # The scope's exploration settings carry over: without them the A/B would log no
            # exploration and the next Q would lose its action coverage (section 3.2).
            exploration = running.exploration if running is not None else None
            if running is not None:
                stop_experiment(session, experiment_id=running.id)
            experiment = create_experiment(
                session,
                name=f"iteration {ctx.iteration.id}",
                business_id=ctx.iteration.business_id,
                arms=[
                    ArmSpec("control", ctx.iteration.parent_policy_id, 1.0 - weight),
                    ArmSpec("treatment", candidate, weight),
                ],
                exploration=exploration,
            )
        locked = service.get_iteration(session, iteration_id=ctx.iteration.id)
        locked.experiment_id = experiment.id
        experiment_id = experiment.id
    return {"experiment_id": experiment_id}, {}


STEPS: dict[Step, Callable[[Context], tuple[dict[str, Any], dict[str, Any]]]] = {
    Step.RETURNS: step_returns,
    Step.FIT_Q: step_fit_q,
    Step.EVALUATE_Q: step_evaluate_q,
    Step.IMPROVE: step_improve,
    Step.CHECK: step_check,
    Step.REGISTER: step_register,
    Step.DEPLOY: step_deploy,
}


def run_step(
    factory: sessionmaker[Session], settings: Settings, iteration_id: str, step: Step
) -> Step | None:
    """Run one step if it is due; return the next step to enqueue (None: nothing to send)."""
    with session_scope(factory) as session:
        start = service.begin_step(
            session,
            iteration_id=iteration_id,
            step=step,
            worker=worker_name(),
            lease_s=settings.step_lease_s,
        )
        iteration = service.get_iteration(session, iteration_id=iteration_id)
    if start.action == "skip":
        log.info("iteration %s step %s skipped: %s", iteration_id, step.value, start.reason)
        return None
    if start.action == "wait":
        raise StepBusy(f"{step.value} of {iteration_id}: {start.reason}")

    def progress(fraction: float) -> None:
        with session_scope(factory) as session:
            service.set_progress(session, iteration_id=iteration_id, step=step, fraction=fraction)

    log.info("iteration %s: %s (attempt %d)", iteration_id, step.value, start.attempt)
    try:
        result, metrics = STEPS[step](
            Context(factory, settings, iteration, start.attempt, progress)
        )
    except service.IterationCancelled:
        log.info("iteration %s: %s stopped, the iteration was cancelled", iteration_id, step.value)
        with session_scope(factory) as session:
            service.abandon_step(session, iteration_id=iteration_id, step=step)
        return None
    except Exception as exc:
        log.exception("iteration %s step %s failed", iteration_id, step.value)
        with session_scope(factory) as session:
            service.fail_step(
                session, iteration_id=iteration_id, step=step, error=f"{type(exc).__name__}: {exc}"
            )
        return None
    with session_scope(factory) as session:
        return service.finish_step(
            session, iteration_id=iteration_id, step=step, result=result, metrics=metrics
        )


def run_inline(
    factory: sessionmaker[Session], settings: Settings, iteration_id: str, step: Step | None
) -> None:
    """The embedded default: run steps in this process until the iteration blocks or ends."""
    while step is not None:
        step = run_step(factory, settings, iteration_id, step)
