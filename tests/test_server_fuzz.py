"""A bounded request fuzzer on loopback: every malformed request gets a 4xx with a JSON error body, and the
server still answers a valid request afterwards."""

from __future__ import annotations

import http.client
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.engine.serve.server import MAX_BODY_BYTES, ChatServer

TIMEOUT_S = 60
VALID = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
N_RANDOM = 40  # random mutations on top of the fixed cases: the fuzzer's bound


@pytest.fixture(scope="module")
def server(tiny_nkat: Path) -> Iterator[ChatServer]:
    with NkatRuntime(tiny_nkat, RuntimeOptions(n_ctx=256, n_threads=1)) as runtime, \
            ChatServer(runtime, port=0, quiet=True) as chat_server:
        chat_server.start()
        yield chat_server


def send(server: ChatServer, body: bytes, headers: dict[str, str] | None = None,
         path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    host, port = server.address
    assert host == "127.0.0.1"
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        conn.putrequest("POST", path)
        for key, value in (headers or {"Content-Type": "application/json",
                                       "Content-Length": str(len(body))}).items():
            conn.putheader(key, value)
        conn.endheaders()
        conn.send(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def with_fields(**fields: object) -> bytes:
    return json.dumps({**VALID, **fields}).encode()


FIXED = [
    b"", b"{", b"[]", b"null", b"42", b'"text"', b"{\"messages\": }", b"\xff\xfe\x00", b"[" * 100_000,
    json.dumps({"messages": "hello"}).encode(), json.dumps({"messages": []}).encode(),
    json.dumps({"messages": [1, 2]}).encode(), json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
    json.dumps({"messages": [{"role": "user"}]}).encode(),
    with_fields(max_tokens=-1), with_fields(max_tokens=0), with_fields(max_tokens=10**12), with_fields(max_tokens="5"),
    with_fields(max_tokens=2.5), with_fields(max_tokens=True), with_fields(temperature="hot"),
    with_fields(temperature=-1), with_fields(temperature=1e308), b'{"messages": [{"role": "user", "content": "x"}],'
    b' "temperature": NaN}', with_fields(top_p=2), with_fields(top_k=-3), with_fields(seed="s"),
    with_fields(stop=5), with_fields(stop=["a"] * 100), with_fields(nkat_gamma=-1), with_fields(nkat_gamma=1e9),
    with_fields(nkat_gamma="1"), with_fields(nkat_gamma=True), b'{"messages": [{"role": "user", "content": "x"}],'
    b' "nkat_gamma": Infinity}', with_fields(stream="yes"), with_fields(response_format="json"),
    with_fields(tools={"a": 1}), with_fields(repeat_penalty=-5), with_fields(presence_penalty=9),
]
HEADERS = [
    {"Content-Length": "abc"}, {"Content-Length": "-5"}, {"Content-Length": str(MAX_BODY_BYTES + 1)},
    {"Content-Length": "1e3"}, {"Content-Length": ""}, {"Transfer-Encoding": "chunked"},
]


def mutations(seed: int = 0) -> Iterator[bytes]:
    """Random byte flips and truncations of a valid body, and random values in random fields."""
    rng = random.Random(seed)
    valid = with_fields()
    junk = [None, -1, 0, 1e30, -1e30, "", "x" * 1000, [], {}, [1, "a"], True]
    for i in range(N_RANDOM):
        if i % 2:
            raw = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            yield bytes(raw[: rng.randint(1, len(raw))])
        else:
            field = rng.choice(["max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "nkat_gamma",
                                "messages", "min_p", "typical_p"])
            yield json.dumps({**VALID, field: rng.choice(junk)}).encode()


def assert_client_error(status: int, raw: bytes, what: object) -> None:
    assert 400 <= status < 500, f"{what!r}: {status} {raw[:300]!r}"
    assert "message" in json.loads(raw)["error"], raw


def test_malformed_requests_get_4xx_json_errors_and_the_server_keeps_answering(server: ChatServer) -> None:
    for body in FIXED:
        assert_client_error(*send(server, body), body[:80])
    for headers in HEADERS:
        assert_client_error(*send(server, b"{}", headers), headers)
    for body in mutations():
        status, raw = send(server, body)
        if status == 200:  # a flip may leave a valid request: then it must be a completion
            assert json.loads(raw)["choices"], raw
        else:
            assert_client_error(status, raw, body[:80])
    status, raw = send(server, with_fields())
    assert status == 200 and json.loads(raw)["choices"], raw
