"""Imports flow one way: workers/learning (pure ML) <- services/* (the API's domains) <- the
worker and runner layer (workers/pipeline, tasks, celery_app, runner). Only the composition
roots services/cli.py and services/demo.py reach up into the runner layer. And the API process
never loads torch, transformers, peft or trl."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER_LAYER = ("workers.pipeline", "workers.tasks", "workers.celery_app", "workers.runner")
COMPOSITION_ROOTS = {"services.cli", "services.demo"}
HEAVY = ("torch", "transformers", "peft", "trl")
# Third-party packages of the web, the database and the queue: not for the pure learning code.
NOT_LEARNING = ("fastapi", "starlette", "sqlalchemy", "alembic", "psycopg", "celery", "redis")

# Known violations, each to be deleted when it is fixed: {(importing package, imported module)}.
# Empty: the learning code's chat types moved to workers/learning/chat.py.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str) -> Iterator[str]:
    """Every module `source` imports, at module level or inside functions, made absolute."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            # `from workers import runner` imports workers.runner (names that are not modules
            # yield harmless extra entries).
            yield from (f"{base}.{alias.name}" for alias in node.names)


def project_imports() -> Iterator[tuple[str, str]]:
    for top in ("services", "workers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            module = module_name(path)
            for imported in imported_modules(path.read_text(encoding="utf-8"), module):
                yield module, imported


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _allowed(module: str, imported: str) -> bool:
    return any(_under(module, m) and _under(imported, i) for m, i in ALLOWED)


def test_the_import_collector_sees_function_level_and_relative_imports() -> None:
    source = textwrap.dedent(
        """
        import os
        from . import sibling
        def f():
            from workers import runner
            import torch.nn
        """
    )
    found = set(imported_modules(source, "services.iterations.endpoints"))
    assert {"os", "services.iterations.sibling", "workers.runner", "torch.nn"} <= found


def test_learning_imports_no_service_and_no_runner_layer() -> None:
    bad = sorted(
        {
            f"{module} imports {imported}"
            for module, imported in project_imports()
            if _under(module, "workers.learning")
            and (
                _under(imported, "services")
                or any(_under(imported, layer) for layer in RUNNER_LAYER)
                or any(_under(imported, package) for package in NOT_LEARNING)
            )
            and not _allowed(module, imported)
        }
    )
    assert not bad, "workers/learning is the bottom layer:\n" + "\n".join(bad)


def test_services_import_only_the_learning_code_from_workers() -> None:
    bad = sorted(
        f"{module} imports {imported}"
        for module, imported in project_imports()
        if _under(module, "services")
        and module not in COMPOSITION_ROOTS
        and _under(imported, "workers")
        and imported != "workers"
        and not _under(imported, "workers.learning")
    )
    assert not bad, "services/* sit below the worker layer:\n" + "\n".join(bad)


def test_the_allow_list_holds_only_live_violations() -> None:
    """An entry whose violation is gone must be deleted, so the list cannot hide new ones."""
    for package, target in ALLOWED:
        assert any(
            _under(module, package) and _under(imported, target)
            for module, imported in project_imports()
        ), f"{(package, target)} is fixed: delete it from ALLOWED"


API_PROCESS = """
import json, sys
from pathlib import Path

from fastapi.testclient import TestClient

from services.app import create_app
from services.settings import Settings

HEAVY = {heavy!r}
loaded = {{"after import services.app": [m for m in HEAVY if m in sys.modules]}}

from services.db import make_engine, make_session_factory, session_scope
from services.policies.models import PolicyStatus
from services.policies.service import register_policy
from services.tenants.models import Role
from services.tenants.service import create_api_key

data_dir = Path({data_dir!r})
settings = Settings(data_dir=data_dir, task_runner="celery", redis_url={redis_url!r})
statuses = {{}}
with TestClient(create_app(settings)) as client:
    with session_scope(make_session_factory(make_engine(settings.sqlalchemy_url))) as session:
        key = create_api_key(session, role=Role.OPERATOR)
        register_policy(
            session, policy_id="p0", base_model="/m", adapter_uri="/a",
            status=PolicyStatus.APPROVED,
        )
    headers = {{"Authorization": f"Bearer {{key}}"}}
    statuses["bad"] = client.post(
        "/v1/iterations", json={{"hyperparameters": {{"n_epochs": 1.5}}}}, headers=headers
    ).status_code
    statuses["schema"] = client.get("/v1/iterations/schema", headers=headers).status_code
    statuses["openapi"] = client.get("/openapi.json").status_code
    statuses["created"] = client.post(
        "/v1/iterations", json={{"parent_policy_id": "p0"}}, headers=headers
    ).status_code
loaded["after the iterations API"] = [m for m in HEAVY if m in sys.modules]

from services.cli import api_app

api_app()  # what `outcomeloop serve` builds, with its runner
loaded["after building the served app"] = [m for m in HEAVY if m in sys.modules]
print(json.dumps({{"loaded": loaded, "statuses": statuses}}))
"""


def test_the_api_process_loads_no_ml_stack(broker: str, tmp_path: Path) -> None:
    """In a fresh interpreter: import the app, validate and create an iteration over HTTP
    (configs resolved, the step sent to the real broker), build the served app."""
    script = API_PROCESS.format(heavy=HEAVY, data_dir=str(tmp_path), redis_url=broker)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTCOMELOOP_")}
    env["OUTCOMELOOP_DATA_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["statuses"] == {"bad": 422, "schema": 200, "openapi": 200, "created": 201}
    assert result["loaded"] == {
        "after import services.app": [],
        "after the iterations API": [],
        "after building the served app": [],
    }


@pytest.mark.parametrize("module", ["services.app", "services.iterations.endpoints"])
def test_importing_the_api_loads_no_ml_stack(module: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import json, sys, {module}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_no_import_cycles_between_project_modules() -> None:
    """No two modules reach each other, even through function-level imports (improve.py once
    imported the trainers, which imported improve.py back)."""
    graph: dict[str, set[str]] = {}
    modules = {module for module, _ in project_imports()}
    for module, imported in project_imports():
        if imported in modules and imported != module:
            graph.setdefault(module, set()).add(imported)
    cycles = []
    for start in sorted(graph):
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "\n".join(sorted(set(cycles))[:10])
