"""The `outcomeloop` command line: the edge where CLI commands open and commit transactions."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from services.db import make_engine, make_session_factory, session_scope
from services.settings import Settings, get_settings

app = typer.Typer(
    help="outcomeloop: suggested responses that drive conversation outcomes.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")

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
