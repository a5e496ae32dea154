"""The benchmarks' results file: one JSON line per run with machine, date, commit and figures
(tests/benchmarks/results.jsonl, which the README quotes)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def append_result(path: Path, benchmark: str, figures: dict[str, Any]) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    record = {
        "benchmark": benchmark,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit + ("+changes" if dirty else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        **figures,
    }
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
