"""JSON Lines import/export of whole conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.conversations.jsonl import export_lines, import_lines
from services.db import session_scope
from services.settings import get_settings
from tests.conftest import Store

CANONICAL = [
    {
        "id": "conv-1",
        "business_id": "acme",
        "messages": [
            {"role": "customer", "text": "Do you install heat pumps?"},
            {
                "role": "business",
                "text": "Yes, we do! What is the size of your house?",
                "suggestion": "Yes, we do! How big is your house?",
            },
            {"role": "customer", "text": "120 square meters"},
            {"role": "business", "text": "Let's book a visit.", "suggestion": None},
            {"role": "customer", "text": "Ok, Monday.", "outcome": True},
            {"role": "business", "text": "Booked!", "suggestion": "Booked!"},
        ],
        "outcome": 1,
        "end": "outcome",
        "meta": {"source": "test"},
    },
    {
        "id": "conv-2",
        "business_id": "acme",
        "messages": [
            {"role": "business", "text": "Hi! Winter offer on boilers."},
            {"role": "customer", "text": "Not interested."},
        ],
        "outcome": 0,
        "end": "customer_left",
    },
    {
        "id": "conv-3",
        "business_id": "globex",
        "messages": [{"role": "customer", "text": "Hello?"}],
        "outcome": None,
        "end": None,
    },
]


def _import(store: Store, lines: list[str]):  # type: ignore[no-untyped-def]
    session = store.factory()
    try:
        report = import_lines(session, lines, settings=store.settings)
        if report.ok:
            session.commit()
        else:
            session.rollback()
        return report
    finally:
        session.close()


def _export(store: Store, business_ids: set[str]) -> list[dict]:  # type: ignore[type-arg]
    with session_scope(store.factory) as session:
        rows = [json.loads(line) for line in export_lines(session)]
    return [row for row in rows if row["business_id"] in business_ids]


def _scoped(records: list[dict], suffix: str) -> list[dict]:  # type: ignore[type-arg]
    """Give every business a per-test name so tests sharing a database do not collide."""
    return [{**r, "business_id": f"{r['business_id']}-{suffix}"} for r in records]


def test_round_trip_gives_the_same_conversations(
    store: Store, request: pytest.FixtureRequest
) -> None:
    records = _scoped(CANONICAL, request.node.callspec.id)
    report = _import(store, [json.dumps(r) for r in records])
    assert report.ok and report.imported == 3
    assert sorted(report.businesses_created) == sorted({r["business_id"] for r in records})
    assert _export(store, {r["business_id"] for r in records}) == records


def test_reimport_adds_nothing(store: Store, request: pytest.FixtureRequest) -> None:
    records = _scoped(CANONICAL, "re-" + request.node.callspec.id)
    lines = [json.dumps(r) for r in records]
    assert _import(store, lines).imported == 3
    again = _import(store, lines)
    assert again.ok and again.imported == 0 and again.unchanged == 3
    assert len(_export(store, {r["business_id"] for r in records})) == 3


def test_shortcut_outcome_lands_on_the_last_message(
    store: Store, request: pytest.FixtureRequest
) -> None:
    business = f"short-{request.node.callspec.id}"
    line = {
        "id": "s1",
        "business_id": business,
        "end": "outcome",
        "outcome": 1,
        "messages": [{"role": "customer", "text": "hi"}, {"role": "business", "text": "yo"}],
    }
    assert _import(store, [json.dumps(line)]).ok
    [exported] = _export(store, {business})
    assert exported["messages"][-1] == {"role": "business", "text": "yo", "outcome": True}
    assert exported["outcome"] == 1


def test_a_bad_line_rejects_the_whole_file_with_reasons(
    store: Store, request: pytest.FixtureRequest
) -> None:
    business = f"bad-{request.node.callspec.id}"
    good = {"id": "ok", "business_id": business, "messages": [{"role": "customer", "text": "a"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "id": "r", "messages": [{"role": "robot", "text": "a"}]}),
        json.dumps(
            {**good, "id": "s", "messages": [{"role": "customer", "text": "a", "suggestion": "b"}]}
        ),
        json.dumps(
            {
                **good,
                "id": "o",
                "outcome": 0,
                "messages": [{"role": "customer", "text": "a", "outcome": True}],
            }
        ),
        json.dumps({**good, "id": "e", "end": "outcome"}),
        json.dumps(good),
        json.dumps({**good, "id": "big", "messages": [{"role": "customer", "text": "x" * 9000}]}),
        json.dumps({**good, "id": "x", "business_id": "Not A Slug"}),
        json.dumps({**good, "id": "n", "messages": []}),
        "[1, 2]",
    ]
    report = _import(store, lines)
    reasons = {e.line: e.reason for e in report.errors}
    assert set(reasons) == {2, 3, 4, 5, 6, 7, 8, 9, 10, 11}
    assert "malformed JSON" in reasons[2]
    assert "role" in reasons[3]
    assert "only allowed on business" in reasons[4]
    assert "outcome" in reasons[5] and "outcome" in reasons[6]
    assert "line 1" in reasons[7]
    assert "8000" in reasons[8]
    assert "business" in reasons[9]
    assert "messages" in reasons[10]
    assert "object" in reasons[11]
    assert report.imported == 0
    assert _export(store, {business}) == []


def test_same_id_with_different_content_is_refused(
    store: Store, request: pytest.FixtureRequest
) -> None:
    business = f"diff-{request.node.callspec.id}"
    line = {"id": "d", "business_id": business, "messages": [{"role": "customer", "text": "a"}]}
    assert _import(store, [json.dumps(line)]).ok
    changed = {**line, "messages": [{"role": "customer", "text": "b"}]}
    report = _import(store, [json.dumps(changed)])
    assert not report.ok and "different content" in report.errors[0].reason


def test_cli_import_export_round_trip(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("OUTCOMELOOP_DATABASE_URL", store.settings.sqlalchemy_url)
    monkeypatch.setenv("OUTCOMELOOP_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    records = _scoped(CANONICAL, "cli-" + request.node.callspec.id)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    runner = CliRunner()
    try:
        first = runner.invoke(app, ["import", str(source)])
        assert first.exit_code == 0, first.output
        assert "imported 3" in first.output
        second = runner.invoke(app, ["import", str(source)])
        assert "imported 0" in second.output and "3 already present" in second.output
        target = tmp_path / "out.jsonl"
        for record in records[:2]:
            out = runner.invoke(app, ["export", str(target), "--business", record["business_id"]])
            assert out.exit_code == 0, out.output
            assert [json.loads(x) for x in target.read_text().splitlines()] == [
                r for r in records if r["business_id"] == record["business_id"]
            ]
        broken = tmp_path / "broken.jsonl"
        broken.write_text(json.dumps(records[0]) + "\n{oops\n")
        failed = runner.invoke(app, ["import", str(broken)])
        assert failed.exit_code == 1
        assert ":2:" in failed.output and "nothing was imported" in failed.output
        missing = runner.invoke(app, ["import", str(tmp_path / "nope.jsonl")])
        assert missing.exit_code == 2 and "no such file" in missing.output
    finally:
        get_settings.cache_clear()
