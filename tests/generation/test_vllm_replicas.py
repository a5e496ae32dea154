"""Several vLLM replicas as one backend, and a dead engine answered fast: over real HTTP, against
`RecordingVllmStub` (test_vllm_request.py), one stub a replica."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from services.generation.base import (
    AdapterRef,
    BackendError,
    BackendUnavailable,
    GenerationRequest,
    SamplingParams,
)
from services.generation.vllm import VllmBackend, split_urls
from tests.generation.test_vllm_request import PROMPT, RecordingVllmStub

ARM = AdapterRef("pol_a-v1", "/adapters/pol_a-v1")
REQUEST = GenerationRequest(PROMPT, ARM, SamplingParams(max_new_tokens=8, temperature=0.7))


@pytest.fixture
def stubs() -> Iterator[list[RecordingVllmStub]]:
    servers = [RecordingVllmStub() for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def paths(stub: RecordingVllmStub, path: str) -> int:
    return sum(1 for p, _ in stub.requests if p == path)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def test_urls_are_split_and_deduplicated() -> None:
    assert split_urls(" http://a:1/, http://b:2 ,http://a:1") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="no vLLM URL"):
        split_urls(" , ")


def test_every_replica_loads_the_adapter_and_requests_take_turns(
    stubs: list[RecordingVllmStub],
) -> None:
    backend = VllmBackend(",".join(s.url for s in stubs))
    try:
        backend.load_adapter(ARM)
        assert [paths(s, "/v1/load_lora_adapter") for s in stubs] == [1, 1]
        for _ in range(4):
            assert backend.generate(REQUEST, timeout=10).completions[0].text == "Yes, we do."
        assert [paths(s, "/v1/chat/completions") for s in stubs] == [2, 2]
        assert [paths(s, "/v1/load_lora_adapter") for s in stubs] == [1, 1]  # loaded once each
    finally:
        backend.close()


def test_a_dead_replica_is_set_aside_and_the_other_serves(
    stubs: list[RecordingVllmStub],
) -> None:
    dead, alive = stubs
    backend = VllmBackend([dead.url, alive.url], down_for_s=60)
    try:
        backend.load_adapter(ARM)
        dead.dead = True
        for _ in range(3):
            assert backend.generate(REQUEST, timeout=10).completions
        # One request found it dead (500 and /health 503); none went there after that.
        assert paths(dead, "/v1/chat/completions") <= 1
        assert paths(alive, "/v1/chat/completions") == 3
        status = {s["url"]: s for s in backend.replica_status()}
        assert not status[dead.url]["up"] and "/health fails" in status[dead.url]["reason"]
        assert status[alive.url]["up"]
    finally:
        backend.close()


def test_with_every_replica_dead_it_fails_fast_and_recovers(
    stubs: list[RecordingVllmStub],
) -> None:
    for stub in stubs:
        stub.dead = True
    backend = VllmBackend([s.url for s in stubs], down_for_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="no vLLM replica"):
            backend.generate(REQUEST, timeout=60)
        assert time.monotonic() - started < 5  # not the 60 s generation timeout
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):  # both set aside: no HTTP call at all
            backend.generate(REQUEST, timeout=60)
        assert time.monotonic() - started < 0.2
        for stub in stubs:
            stub.dead = False  # restarted, adapters forgotten
        time.sleep(0.6)
        assert backend.generate(REQUEST, timeout=10).completions
        assert sum(paths(s, "/v1/load_lora_adapter") for s in stubs) >= 1
    finally:
        backend.close()


def test_an_unreachable_replica_is_skipped(stubs: list[RecordingVllmStub]) -> None:
    backend = VllmBackend([closed_port_url(), stubs[0].url], connect_timeout=1.0)
    try:
        for _ in range(2):
            assert backend.generate(REQUEST, timeout=10).completions
        assert paths(stubs[0], "/v1/chat/completions") == 2
    finally:
        backend.close()


def test_an_error_from_a_live_engine_is_not_a_dead_replica(
    stubs: list[RecordingVllmStub], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 500 while /health passes is the request's problem: reported, the replica kept."""
    backend = VllmBackend(stubs[0].url)
    try:
        backend.load_adapter(ARM)
        stubs[0].dead = True
        monkeypatch.setattr(VllmBackend, "_healthy", lambda self, replica: True)
        with pytest.raises(BackendError, match="answered 500") as caught:
            backend.generate(REQUEST, timeout=10)
        assert not isinstance(caught.value, BackendUnavailable)
        assert backend.replica_status()[0]["up"]
    finally:
        backend.close()
