"""An OpenAI-compatible HTTP server over one NkatRuntime: theta applied at γ, γ switchable per request.

Built on the standard library's `http.server`, not llama-cpp-python's FastAPI server: that server
builds its own `Llama` from settings, where theta could only be a `lora_path` at a fixed scale, and
it needs five more packages (fastapi, uvicorn, sse-starlette, starlette-context, pydantic-settings).
A request may carry `"nkat_gamma"` (a number, or null for theta off) to use another γ without
reloading anything. A request without `"temperature"` samples at the file's fitted temperature
(`nkat.confidence.temperature`) when it has one, else at llama-cpp-python's default; every response
says which in `"nkat_temperature"`.

Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions (with `"stream": true` as server-sent
events).

Concurrency policy (one llama.cpp context, so one generation at a time; engine/serve/admission.py):
- each connection has its own thread; parsing and checking a request, `GET /v1/models` and `GET /health`
  never wait for the generation, so they are answered while one runs;
- a valid chat request runs at once if nothing is generating, else waits in a first-come-first-served
  queue of at most `max_queue` requests; beyond that it gets 503 at once, with a JSON error and
  `Retry-After` (the last generation's duration in whole seconds, at least 1);
- a request that waits `queue_timeout_s` without starting gets the same 503; once started, a generation
  is bounded by its `max_tokens` (at most the context size), and a streaming one stops when its client
  goes away;
- every socket read or write waits at most SOCKET_TIMEOUT_S (a silent client gets 408 or is dropped).

Why some of 32 concurrent clients used to get a connection reset instead of an answer (found with the
load of tests/test_server_load.py):
- a request refused before its body was read (over the size limit, a bad Content-Length, a body longer
  than its Content-Length, chunked encoding) left input unread, and closing a socket with unread input
  makes the kernel send RST: the client, still sending its body, fails with a broken pipe or a reset and
  never reads the answer. Now every connection ends with a lingering close: the answer, a shutdown of
  the sending side, then reading and dropping what the client still sends (for at most LINGER_S);
  without it, test_a_body_left_unread_still_gets_its_answer fails every time;
- the listen backlog was socketserver's 5: a burst of 32 connections overflowed it, the kernel logged
  "Possible SYN flooding ... Sending cookies" and counted ListenOverflows, clients waited a second for a
  SYN retransmit, and now and then one got a reset. It is LISTEN_BACKLOG now.
Two more things the load showed: a 3 MB prompt held the generation slot while llama.cpp tokenized it
(seconds, with every other client waiting), so messages whose text cannot fit the context are refused
before the queue (`check_prompt_fits`); and each wave of multi-megabyte bodies grew the process by
megabytes, kept in glibc's per-thread arenas (engine/serve/heap.py).
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from nkat_gguf.engine.serve.admission import Busy, GenerationQueue
from nkat_gguf.engine.serve.heap import map_large_blocks
from nkat_gguf.engine.llama.runtime import NkatRuntime
from nkat_gguf.engine.llama.vocab import longest_piece_bytes
from nkat_gguf.errors import InputError
from nkat_gguf.format import nkat
from nkat_gguf.format.nkat import check_gamma

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_QUEUE = 16  # requests waiting for the generation slot; more get 503
DEFAULT_QUEUE_TIMEOUT_S = 120.0  # longest wait for the slot before a 503
SOCKET_TIMEOUT_S = 30.0  # longest wait for one read or write on a client's socket
LINGER_S = 2.0  # longest time spent draining what a client still sends after its answer
MAPPED_BLOCK_BYTES = 1 << 20  # heap blocks this large go back to the system when freed (engine/serve/heap.py)
LISTEN_BACKLOG = 128  # connections the kernel holds before they are accepted (socketserver's default: 5)
GAMMA_FIELD = "nkat_gamma"
TEMPERATURE_FIELD = "nkat_temperature"  # in responses: the temperature used (null: llama-cpp-python's default)
# OpenAI request fields passed on to llama-cpp-python's create_chat_completion; others are ignored
FORWARDED = ("messages", "temperature", "top_p", "top_k", "min_p", "typical_p", "stop", "seed", "max_tokens",
             "presence_penalty", "frequency_penalty", "repeat_penalty", "response_format", "tools", "tool_choice")
_UNSET = object()


class RequestError(Exception):
    """A request the client must fix: answered with `status` (400 unless said) and OpenAI's error body."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class ChatServer:
    """Serves `runtime` on host:port (port 0 picks a free one); `close()` stops it and frees the socket."""

    def __init__(self, runtime: NkatRuntime, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 model_id: str | None = None, quiet: bool = False, max_queue: int = DEFAULT_MAX_QUEUE,
                 queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S):
        if max_queue < 0 or not queue_timeout_s > 0:
            raise InputError(f"the queue needs max_queue >= 0 and a timeout > 0 s, got {max_queue} and "
                             f"{queue_timeout_s:g} s")
        self.runtime = runtime
        self.model_id = model_id or runtime.path.name
        self.default_gamma = runtime.gamma
        self.default_temperature = runtime.temperature.temperature if runtime.temperature else None
        self.quiet = quiet
        self.created = int(time.time())
        self.queue = GenerationQueue(max_queue, queue_timeout_s)
        self.longest_piece_bytes = longest_piece_bytes(runtime.llm)
        map_large_blocks(MAPPED_BLOCK_BYTES)  # else each thread's arena keeps the bodies it read
        self._serving = False
        self._thread: threading.Thread | None = None
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        try:
            self._httpd = server_class((host, port), _Handler)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self._httpd.app = self

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"

    def serve_forever(self) -> None:
        """Serve in this thread until close() is called from another one (or KeyboardInterrupt)."""
        self._serving = True
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._serving = False

    def start(self) -> None:
        """Serve in a background thread; close() stops it."""
        self._serving = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="nkat-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the socket (shutdown() returns once the serving loop has exited)."""
        if self._serving:
            self._httpd.shutdown()
            self._serving = False
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "ChatServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests -------------------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "nkat-gguf",
            "nkat": {"has_theta": self.runtime.has_theta, "default_gamma": self.default_gamma,
                     "default_temperature": self.default_temperature,
                     "default_temperature_source": nkat.TEMPERATURE
                     if self.default_temperature is not None else "llama-cpp-python"}}]}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, **self.queue.state()}

    def chat(self, body: Any, stream_to: Any = None) -> dict | None:
        """One chat completion. With `stream_to` (a callable taking each chunk), chunks are passed on.

        Raises RequestError for a request the client must fix, Busy when the generation slot cannot be had.
        """
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        check_request(body, self.runtime.options.n_ctx)
        check_prompt_fits(body["messages"], self.runtime.options.n_ctx, self.longest_piece_bytes)
        kwargs = {k: body[k] for k in FORWARDED if body.get(k) is not None}
        if body.get("max_completion_tokens") is not None:
            kwargs.setdefault("max_tokens", body["max_completion_tokens"])
        if self.default_temperature is not None:
            kwargs.setdefault("temperature", self.default_temperature)
        gamma = body.get(GAMMA_FIELD, _UNSET)
        with self.queue.slot():
            self._use_gamma(self.default_gamma if gamma is _UNSET else gamma)
            extra = {GAMMA_FIELD: self.runtime.gamma, TEMPERATURE_FIELD: kwargs.get("temperature"),
                     "model": self.model_id}
            try:
                if stream_to is None:
                    return {**self.runtime.llm.create_chat_completion(**kwargs), **extra}
                chunks = self.runtime.llm.create_chat_completion(**kwargs, stream=True)
                try:
                    for chunk in chunks:
                        stream_to({**chunk, **extra})
                finally:
                    chunks.close()  # inside the slot: a client that left must not leave it half-run
                return None
            except (ValueError, TypeError) as exc:  # llama-cpp-python's way of refusing arguments
                raise RequestError(str(exc)) from None

    def _use_gamma(self, gamma: Any) -> None:
        if isinstance(gamma, bool) or not (gamma is None or isinstance(gamma, (int, float))):
            raise RequestError(f"'{GAMMA_FIELD}' must be a number or null, got {json.dumps(gamma)}")
        if gamma != self.runtime.gamma:
            try:
                self.runtime.set_gamma(gamma)  # also empties the KV cache computed under the old γ
            except InputError as exc:
                raise RequestError(str(exc)) from None


# OpenAI's documented ranges; a value outside them is the client's mistake, answered with 400
_NUMBERS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "typical_p": (0.0, 1.0),
            "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0), "repeat_penalty": (0.0, 10.0)}
_INTEGERS = {"top_k": (0, 1 << 20), "seed": (-(1 << 31), (1 << 32) - 1)}
_ROLES = ("system", "user", "assistant", "tool", "developer")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_request(body: dict, n_ctx: int) -> None:
    """Every field the server reads has the type and range OpenAI documents; anything else is a RequestError."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise RequestError(f"messages[{i}] must be an object with 'role' one of {', '.join(_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{i}].content must be a string")
    for key, (low, high) in _NUMBERS.items():
        value = body.get(key)
        if value is not None and not (_is_number(value) and low <= value <= high):
            raise RequestError(f"'{key}' must be a number from {low:g} to {high:g}, got {json.dumps(value)}")
    for key, (low, high) in {**_INTEGERS, "max_tokens": (1, n_ctx), "max_completion_tokens": (1, n_ctx)}.items():
        value = body.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
            raise RequestError(f"'{key}' must be a whole number from {low} to {high}, got {json.dumps(value)}")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 16
                                                           and all(isinstance(s, str) for s in stop))):
        raise RequestError("'stop' must be a string or a list of at most 16 strings")
    for key, kind in (("response_format", dict), ("tools", list), ("stream", bool)):
        if body.get(key) is not None and not isinstance(body[key], kind):
            raise RequestError(f"'{key}' must be a JSON {'object' if kind is dict else kind.__name__}")
    gamma = body.get(GAMMA_FIELD)
    if gamma is not None:
        if not _is_number(gamma):
            raise RequestError(f"'{GAMMA_FIELD}' must be a number or null, got {json.dumps(gamma)}")
        try:
            check_gamma(gamma)
        except InputError as exc:
            raise RequestError(str(exc)) from None


def check_prompt_fits(messages: list[dict], n_ctx: int, longest_piece_bytes: int) -> None:
    """Refuse, before taking the generation slot, messages whose text cannot fit in n_ctx tokens."""
    text_bytes = sum(len(message["content"].encode("utf-8", "surrogatepass")) for message in messages)
    if text_bytes > n_ctx * longest_piece_bytes:
        raise RequestError(f"the messages hold {text_bytes} bytes of text, at least "
                           f"{math.ceil(text_bytes / longest_piece_bytes)} tokens (no token of this model stands "
                           f"for more than {longest_piece_bytes} bytes): over the context of {n_ctx} tokens")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG
    app: ChatServer

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        """Lingering close: end the answer, then drain what the client still sends, so closing sends no RST.

        Closing a socket that holds unread input makes the kernel answer with RST, and a client that gets
        it before reading the answer loses the answer (or fails in the middle of sending its body).
        """
        try:
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            while (left := deadline - time.monotonic()) > 0:
                request.settimeout(left)
                if not request.recv(1 << 16):  # the client has closed its side
                    break
        except OSError:  # the client is gone already, or the linger time ran out
            pass
        self.close_request(request)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "nkat-gguf"
    timeout = SOCKET_TIMEOUT_S  # per socket operation; StreamRequestHandler applies it to the connection

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.app.quiet:
            super().log_message(format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, headers too long, unknown method) as JSON too."""
        self.close_connection = True
        status = HTTPStatus(code)
        self._send_error(status, message or status.phrase)

    def do_GET(self) -> None:
        path = self.path.rstrip("/")
        if path == "/v1/models":
            self._send_json(HTTPStatus.OK, self.server.app.models())
        elif path == "/health":
            self._send_json(HTTPStatus.OK, self.server.app.health())
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path}")

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}")
            return
        try:
            body = self._read_json()
            if isinstance(body, dict) and body.get("stream"):
                self._stream(body)
            else:
                self._send_json(HTTPStatus.OK, self.server.app.chat(body))
        except RequestError as exc:
            self._send_error(exc.status, str(exc))
        except Busy as exc:
            self._send_error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), {"Retry-After": str(exc.retry_after_s)})
        except (BrokenPipeError, ConnectionResetError):  # the client left: nobody to answer
            self.close_connection = True
        except Exception as exc:  # one failed request must not stop the server
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError("send the body with a Content-Length, not Transfer-Encoding",
                               HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError("Content-Length must be a whole number of bytes") from None
        if length > MAX_BODY_BYTES:
            raise RequestError(f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        if length <= 0:
            raise RequestError(f"request body must be 1 to {MAX_BODY_BYTES} bytes with a Content-Length")
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise RequestError(f"no request body byte for {SOCKET_TIMEOUT_S:g} s",
                               HTTPStatus.REQUEST_TIMEOUT) from None
        if len(raw) < length:
            raise RequestError(f"the body ended after {len(raw)} of {length} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise RequestError(f"request body is not JSON: {exc}") from None

    def _stream(self, body: dict) -> None:
        started = False

        def send(chunk: dict) -> None:
            nonlocal started
            if not started:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                started = True
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()

        try:
            self.server.app.chat(body, stream_to=send)
        except Exception as exc:
            if not started or isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                raise
            send({"error": {"message": str(exc), "type": "server_error"}})  # headers are gone: report in-stream
        if not started:  # a generation with no chunk at all still ends like a stream
            send({"object": "chat.completion.chunk", "choices": []})
        self.wfile.write(b"data: [DONE]\n\n")

    def _send_json(self, status: HTTPStatus, payload: dict, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(raw)

    def _send_error(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(status, {"error": {"message": message, "type": kind, "code": int(status)}}, headers)


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
