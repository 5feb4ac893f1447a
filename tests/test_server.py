"""The OpenAI-compatible server answers real HTTP requests on loopback, and switches γ without reloading."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.engine.serve.server import (DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_QUEUE_TIMEOUT_S, ChatServer,
                                     is_loopback)

TIMEOUT_S = 60
CHAT = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_nkat: Path) -> Iterator[ChatServer]:
    with NkatRuntime(tiny_nkat, RuntimeOptions(n_ctx=512, n_threads=2)) as runtime, \
            ChatServer(runtime, port=0, quiet=True) as chat_server:
        chat_server.start()
        yield chat_server


def request(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def chat(server: ChatServer, **fields: object) -> tuple[int, dict]:
    status, raw = request(server.url + "/chat/completions", json.dumps({**CHAT, **fields}).encode())
    return status, json.loads(raw)


def test_listens_on_loopback_by_default(server: ChatServer) -> None:
    assert DEFAULT_HOST == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_ipv6_loopback(tiny_nkat: Path) -> None:
    with NkatRuntime(tiny_nkat, RuntimeOptions(n_ctx=512, n_threads=2)) as runtime, \
            ChatServer(runtime, host="::1", port=0, quiet=True) as chat_server:
        chat_server.start()
        assert chat_server.url.startswith("http://[::1]:")
        assert request(chat_server.url + "/models")[0] == 200


def test_models(server: ChatServer) -> None:
    status, raw = request(server.url + "/models")
    model = json.loads(raw)["data"][0]
    assert status == 200 and model["id"] == "tiny.nkat.gguf" and model["object"] == "model"
    assert model["nkat"]["has_theta"] and model["nkat"]["default_gamma"] == pytest.approx(0.97)


def test_chat_completion(server: ChatServer) -> None:
    status, body = chat(server)
    assert status == 200 and body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str) and message["content"]
    assert 0 < body["usage"]["completion_tokens"] <= CHAT["max_tokens"]
    assert body["nkat_gamma"] == pytest.approx(0.97)


def test_gamma_per_request_without_reloading(server: ChatServer) -> None:
    llm = server.runtime.llm
    default = chat(server)[1]["choices"][0]["message"]["content"]
    off = chat(server, nkat_gamma=None)
    strong = chat(server, nkat_gamma=16)
    assert off[1]["nkat_gamma"] is None and strong[1]["nkat_gamma"] == 16
    texts = {default, off[1]["choices"][0]["message"]["content"], strong[1]["choices"][0]["message"]["content"]}
    assert len(texts) == 3  # greedy decoding: each γ gives its own text
    assert chat(server)[1]["choices"][0]["message"]["content"] == default  # back to the default γ
    assert server.runtime.llm is llm  # the same loaded model throughout


def test_stream_gives_the_same_text(server: ChatServer) -> None:
    status, raw = request(server.url + "/chat/completions", json.dumps({**CHAT, "stream": True}).encode())
    events = [line[len(b"data: "):] for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    assert status == 200 and events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == chat(server)[1]["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body, message", [
    (json.dumps({**CHAT, "nkat_gamma": "abc"}).encode(), "must be a number or null"),
    (json.dumps({**CHAT, "nkat_gamma": True}).encode(), "must be a number or null"),
    (json.dumps({**CHAT, "nkat_gamma": -1}).encode(), "out of range"),
    (json.dumps({"max_tokens": 4}).encode(), "'messages' must be a non-empty list"),
    (b"{not json", "not JSON"),
    (b"[]", "must be a JSON object"),
])
def test_bad_requests_get_400_and_the_server_goes_on(server: ChatServer, body: bytes, message: str) -> None:
    status, raw = request(server.url + "/chat/completions", body)
    assert status == 400 and message in json.loads(raw)["error"]["message"]
    assert chat(server)[0] == 200


def test_unknown_path(server: ChatServer) -> None:
    assert request(server.url + "/nothing")[0] == 404
    assert request(server.url + "/completions", b"{}")[0] == 404


def test_cli_serve(tiny_nkat: Path) -> None:
    """`nkat-gguf serve` on a free port: one chat completion through the real command, then Ctrl-C stops it."""
    process = subprocess.Popen([sys.executable, "-m", "nkat_gguf.cli", "serve", str(tiny_nkat), "--port", "0",
                                "--ctx", "512", "--threads", "2", "--max-queue", "4"], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()  # drains
    try:
        deadline, url = time.monotonic() + TIMEOUT_S, None
        while url is None and time.monotonic() < deadline:  # bounded wait for the banner printed after loading
            try:
                match = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", lines.get(timeout=1))
            except queue.Empty:
                continue
            url = match.group(1) if match else None
        assert url, "the server printed no address"
        status, raw = request(url + "/chat/completions", json.dumps(CHAT).encode())
        assert status == 200 and json.loads(raw)["choices"][0]["message"]["role"] == "assistant"
        assert json.loads(request(url.removesuffix("/v1") + "/health")[1])["max_queue"] == 4
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_serve_queue_defaults_are_the_servers() -> None:
    from nkat_gguf.cli.deploy import serve

    defaults = {param.name: param.default for param in serve.params}
    assert defaults["max_queue"] == DEFAULT_MAX_QUEUE and defaults["queue_timeout"] == DEFAULT_QUEUE_TIMEOUT_S
