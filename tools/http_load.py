"""A small concurrent HTTP client for loading the server on loopback: what the load test and the benchmark send.

Every request is sent with http.client on its own connection and ends as an `Outcome`: the HTTP answer, or
the exception that took its place (a reset, a timeout), so a caller can tell "answered with an error" from
"not answered at all".
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Request:
    """One request; `headers=None` sends a JSON Content-Type and the body's true Content-Length."""

    kind: str  # a label for reports: "chat", "stream", "malformed", "oversized", ...
    body: bytes = b""
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: int | None  # None: no HTTP answer (see `error`)
    seconds: float
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    def stream_events(self) -> list[bytes]:
        """The `data:` payloads of a server-sent-event answer, in order."""
        return [line[len(b"data: "):] for line in self.body.split(b"\n\n") if line.startswith(b"data: ")]


def send(port: int, request: Request, timeout_s: float) -> Outcome:
    """Send `request` to 127.0.0.1:port and read the whole answer; each socket operation waits <= timeout_s."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout_s)
    try:
        conn.putrequest(request.method, request.path, skip_accept_encoding=True)
        headers = request.headers if request.headers is not None else {
            "Content-Type": "application/json", "Content-Length": str(len(request.body))}
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        if request.body:
            conn.send(request.body)
        response = conn.getresponse()
        body = response.read()
        return Outcome(request.kind, response.status, time.monotonic() - started, body,
                       {k.lower(): v for k, v in response.getheaders()})
    except (OSError, http.client.HTTPException) as exc:  # resets, timeouts, truncated answers
        return Outcome(request.kind, None, time.monotonic() - started, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def send_all(port: int, requests: list[Request], clients: int, timeout_s: float) -> list[Outcome]:
    """Send every request from `clients` concurrent connections; outcomes in the order of `requests`."""
    with ThreadPoolExecutor(clients, thread_name_prefix="load-client") as pool:
        return list(pool.map(lambda r: send(port, r, timeout_s), requests))


def chat_body(max_tokens: int, stream: bool = False, content: str = "Say hello", **fields: Any) -> bytes:
    """A valid chat request body (greedy unless `temperature` is given)."""
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream, **fields}).encode()
