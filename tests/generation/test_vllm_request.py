"""What the vLLM backend asks the server for: every sampling option pinned, no seed.

vLLM cannot run here (its CPU build lives in a separate venv that CI installs; the slow tests in
test_real_model.py use it), so these tests talk to `RecordingVllmStub`, a local HTTP server
that records request bodies and answers like vLLM's OpenAI server, over real HTTP.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from services.generation.base import AdapterRef, GenerationRequest, SamplingParams
from services.generation.vllm import VllmBackend
from services.policies.prompt import ChatMessage

REPO = Path(__file__).resolve().parents[2]
PROMPT = [ChatMessage("user", "Hi, do you renovate kitchens?")]

CHAT_ANSWER = {
    "choices": [
        {
            "message": {"content": "Yes, we do."},
            "logprobs": {"content": [{"logprob": -0.5}, {"logprob": -0.25}]},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 7},
}


class RecordingVllmStub(ThreadingHTTPServer):
    """A stand-in for vLLM's OpenAI server: records (path, body) of each POST."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.dead = False  # as vLLM-CPU after a seeded request: 500 to all, /health fails

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _StubHandler(BaseHTTPRequestHandler):
    server: RecordingVllmStub

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.requests.append((self.path, json.loads(self.rfile.read(length))))
        if self.server.dead:
            self._answer(500, {"error": "EngineDeadError"})
            return
        self._answer(200, CHAT_ANSWER if self.path == "/v1/chat/completions" else {})

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(503 if self.server.dead else 200, {})
        else:
            self._answer(404, {})

    def _answer(self, status: int, answer: dict[str, Any]) -> None:
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output quiet


@pytest.fixture
def vllm_stub() -> Iterator[RecordingVllmStub]:
    server = RecordingVllmStub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_request_pins_every_sampling_option_and_sends_no_seed(
    vllm_stub: RecordingVllmStub,
) -> None:
    backend = VllmBackend(vllm_stub.url)
    sampling = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.95, n=1, seed=11)
    try:
        result = backend.generate(
            GenerationRequest(PROMPT, AdapterRef("pi1", "/adapters/pi1"), sampling), timeout=10
        )
    finally:
        backend.close()

    [completion] = result.completions
    assert completion.logprob == pytest.approx(-0.75) and completion.num_tokens == 2
    [body] = [body for path, body in vllm_stub.requests if path == "/v1/chat/completions"]
    assert body["temperature"] == 0.7 and body["top_p"] == 0.95
    # Neutral values, stated, so that nothing else shapes what is sampled and logged.
    assert body["repetition_penalty"] == 1.0
    assert body["top_k"] == -1
    assert body["min_p"] == 0.0
    assert "seed" not in body  # a seeded request kills vLLM-CPU 0.32's engine


def test_the_server_ignores_the_model_generation_config() -> None:
    # Without this flag vLLM takes the defaults of the model's generation_config.json
    # (repetition_penalty, top_k, ...) for every option a request does not set.
    serve = (REPO / "deploy" / "vllm" / "serve.sh").read_text()
    assert "--generation-config vllm" in serve
