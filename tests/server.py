"""Run the real API as a uvicorn subprocess (`python -m services serve`) for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(
    process: subprocess.Popen[bytes],
    health_url: str,
    log_path: Path,
    *,
    timeout: float,
    interval: float = 0.2,
) -> None:
    """Poll `health_url` until it answers 200; fail with the process log if it dies or stalls."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"{health_url}: process exited early:\n{log_path.read_text()[-5000:]}"
            )
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{health_url}: not up in {timeout}s:\n{log_path.read_text()[-5000:]}"
            )
        time.sleep(interval)


@contextmanager
def running_server(env: dict[str, str], log_path: Path, timeout: float = 60.0) -> Iterator[str]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services", "serve", "--port", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(process, f"{base_url}/healthz", log_path, timeout=timeout)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
