"""`outcomeloop demo --quick` end to end on the default model: every stage runs (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.real_model import prepared_smollm2

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OUTCOMELOOP_DATA_DIR": str(tmp_path),
        "OUTCOMELOOP_BASE_MODEL": str(prepared_smollm2()),
        "OUTCOMELOOP_LOG_LEVEL": "WARNING",
        "COLUMNS": "200",
    }
    env.pop("OUTCOMELOOP_DATABASE_URL", None)
    report = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "services", "demo", "--quick", "--report", str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = done.stdout
    assert "outcome (CI)" in out
    assert "approved automatically" in out, "the demo must say it played the operator"
    assert "Q held-out AUC" in out and "A/B pi0 vs it-" in out
    assert "sim. score" in out and "PPO: Q of samples" in out
    assert " pp (95% CI " in out, "the iteration line compares its own A/B's arms in points"
    assert "simulator only, the same 4 simulated customers under both policies" in out
    page = report.read_text()
    assert page.startswith("<!doctype html>") and page.count("<svg") == 2
    assert "Verdict" in page and "http" not in page.split("<body>")[1].replace(
        "http://www.w3.org/2000/svg", ""
    ), "self-contained: no external resources"
