"""The server under load on loopback: 32 concurrent clients in two identical waves, valid, streaming,
malformed and oversized requests mixed. Every request gets an HTTP answer (never a reset) within its
bound, health answers throughout, memory is steady across waves; the queue policy holds exactly."""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.engine.serve.server import DEFAULT_MAX_QUEUE, MAX_BODY_BYTES, ChatServer
from tools.http_load import Outcome, Request, chat_body, send, send_all

CLIENTS = 32
MAX_TOKENS = 8
QUEUE_TIMEOUT_S = 20.0
SOCKET_TIMEOUT_S = 30.0  # the clients' own bound on each socket operation: past it, the request hung
REQUEST_BOUND_S = QUEUE_TIMEOUT_S + 10.0  # queue wait plus one tiny generation, with room for a busy machine
HEALTH_BOUND_S = 5.0
RSS_TOLERANCE = 0.10

THREE_MB = 3_000_000
UNREAD_BYTES = MAX_BODY_BYTES + 1
HEADER_JUNK = {"Content-Type": "application/json"}


def wave() -> list[Request]:
    """32 requests: 16 valid generations (fewer than the default queue holds, so all must complete)."""
    malformed = [b"{not json", b"[]", json.dumps({"messages": []}).encode(), chat_body(MAX_TOKENS, temperature=9)]
    requests = [Request("chat", chat_body(MAX_TOKENS)) for _ in range(8)]
    requests += [Request("stream", chat_body(MAX_TOKENS, stream=True)) for _ in range(8)]
    requests += [Request("malformed", body) for body in malformed]
    requests += [Request("bad-length", b"{}", headers={**HEADER_JUNK, "Content-Length": "abc"}),
                 Request("chunked", b"2\r\n{}\r\n0\r\n\r\n", headers={**HEADER_JUNK, "Transfer-Encoding": "chunked"})]
    requests += [Request("short-length", chat_body(MAX_TOKENS, content="y" * 1000),  # body longer than it says
                         headers={**HEADER_JUNK, "Content-Length": "40"}) for _ in range(2)]
    requests += [Request("oversized", b" " * (MAX_BODY_BYTES + (1 << 20))) for _ in range(4)]
    requests += [Request("3MB-prompt", chat_body(MAX_TOKENS, content="x" * THREE_MB)) for _ in range(2)]
    requests += [Request("3MB-junk", b"[" * THREE_MB) for _ in range(2)]
    assert len(requests) == CLIENTS
    return requests


EXPECTED_STATUS = {"chat": 200, "stream": 200, "malformed": 400, "bad-length": 400, "chunked": 411,
                   "short-length": 400, "oversized": 413, "3MB-prompt": 400, "3MB-junk": 400}


@pytest.fixture(scope="module")
def runtime(tiny_nkat: Path) -> Iterator[NkatRuntime]:
    with NkatRuntime(tiny_nkat, RuntimeOptions(n_ctx=256, n_threads=1)) as loaded:
        yield loaded


def port_of(server: ChatServer) -> int:
    host, port = server.address
    assert host == "127.0.0.1"
    return port


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def assert_answered(outcome: Outcome) -> None:
    """An HTTP answer of the kind's expected status, complete: a completion, a stream, or a JSON error."""
    assert outcome.status is not None, f"{outcome.kind}: no HTTP answer: {outcome.error}"
    assert outcome.seconds < REQUEST_BOUND_S, f"{outcome.kind} took {outcome.seconds:.1f} s"
    assert outcome.status == EXPECTED_STATUS[outcome.kind], (outcome.kind, outcome.status, outcome.body[:300])
    if outcome.kind == "chat":
        answer = outcome.json()
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        assert 0 < answer["usage"]["completion_tokens"] <= MAX_TOKENS
    elif outcome.kind == "stream":
        events = outcome.stream_events()
        assert events[-1] == b"[DONE]" and len(events) > 1
        assert all("error" not in json.loads(event) for event in events[:-1])
    else:
        assert outcome.headers["content-type"] == "application/json"
        assert outcome.json()["error"]["message"]


class HealthPoller:
    """GET /health and /v1/models in turn from its own thread until stopped; records every outcome."""

    def __init__(self, port: int):
        self.port = port
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        paths = ["/health", "/v1/models"]
        while not self._stop.is_set():
            path = paths[len(self.outcomes) % 2]
            self.outcomes.append(send(self.port, Request("health", method="GET", path=path), HEALTH_BOUND_S))
            self._stop.wait(0.05)

    def __enter__(self) -> "HealthPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_two_waves_of_32_clients_all_answered_memory_steady(runtime: NkatRuntime) -> None:
    with ChatServer(runtime, port=0, quiet=True, queue_timeout_s=QUEUE_TIMEOUT_S) as server:
        assert server.queue.max_waiting == DEFAULT_MAX_QUEUE >= 16  # the wave's 16 generations all fit
        server.start()
        port = port_of(server)
        resident = []
        with HealthPoller(port) as health:
            for _ in range(2):
                started = time.monotonic()
                outcomes = send_all(port, wave(), CLIENTS, SOCKET_TIMEOUT_S)
                assert time.monotonic() - started < 2 * REQUEST_BOUND_S
                for outcome in outcomes:
                    assert_answered(outcome)
                gc.collect()
                resident.append(resident_bytes())
        assert len(health.outcomes) >= 2
        for outcome in health.outcomes:
            assert outcome.status == 200, outcome.error or outcome.body[:200]
            assert outcome.seconds < HEALTH_BOUND_S
        after = send(port, Request("health", method="GET", path="/health"), HEALTH_BOUND_S)
        assert after.status == 200 and after.json() == {**after.json(), "generating": False, "waiting": 0}
        assert abs(resident[1] - resident[0]) <= RSS_TOLERANCE * resident[0], resident


def test_queue_full_gets_503_at_once_and_waiters_time_out(runtime: NkatRuntime) -> None:
    """The slot held from here: health still answers, max_queue requests wait, one more gets 503 at once,
    the waiters get 503 after the queue timeout, and once the slot is free a request completes."""
    timeout_s = 1.5
    with ChatServer(runtime, port=0, quiet=True, max_queue=2, queue_timeout_s=timeout_s) as server:
        server.start()
        port = port_of(server)
        waiters: list[Outcome] = []
        with server.queue.slot():
            threads = [threading.Thread(target=lambda: waiters.append(send(port, Request("chat", chat_body(2)),
                                                                           SOCKET_TIMEOUT_S))) for _ in range(2)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + HEALTH_BOUND_S
            while server.queue.state()["waiting"] < 2:
                assert time.monotonic() < deadline, "the two requests never queued"
                time.sleep(0.01)
            for path in ("/health", "/v1/models"):  # answered while a generation holds the slot
                status = send(port, Request("health", method="GET", path=path), HEALTH_BOUND_S)
                assert status.status == 200 and status.seconds < timeout_s
            health = send(port, Request("health", method="GET", path="/health"), HEALTH_BOUND_S).json()
            assert health["generating"] and health["waiting"] == 2 and health["max_queue"] == 2
            refused = send(port, Request("chat", chat_body(2)), SOCKET_TIMEOUT_S)
            assert refused.status == 503 and refused.seconds < timeout_s
            assert int(refused.headers["retry-after"]) >= 1 and "busy" in refused.json()["error"]["message"]
            for thread in threads:
                thread.join(timeout=SOCKET_TIMEOUT_S)
        assert len(waiters) == 2
        for waited in waiters:
            assert waited.status == 503 and timeout_s <= waited.seconds < timeout_s + HEALTH_BOUND_S
            assert "retry-after" in waited.headers and "waited" in waited.json()["error"]["message"]
        done = send(port, Request("chat", chat_body(2)), SOCKET_TIMEOUT_S)
        assert done.status == 200 and done.json()["choices"]


@pytest.mark.parametrize("request_", [
    Request("oversized", b" " * UNREAD_BYTES),
    Request("short-length", b"x" * UNREAD_BYTES, headers={**HEADER_JUNK, "Content-Length": "10"}),
    Request("bad-length", b"x" * UNREAD_BYTES, headers={**HEADER_JUNK, "Content-Length": "abc"}),
], ids=lambda r: r.kind)
def test_a_body_left_unread_still_gets_its_answer(runtime: NkatRuntime, request_: Request) -> None:
    """Refused before its body is read: the answer arrives instead of a reset (the lingering close).

    The bodies are larger than loopback's socket buffers, so the client is still sending when the answer
    is written; without the lingering close its send fails with a broken pipe or a reset."""
    with ChatServer(runtime, port=0, quiet=True) as server:
        server.start()
        outcome = send(port_of(server), request_, SOCKET_TIMEOUT_S)
        assert outcome.status == EXPECTED_STATUS[request_.kind], outcome.error
        assert outcome.json()["error"]["message"]
