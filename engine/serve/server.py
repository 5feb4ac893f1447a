"""An OpenAI-compatible HTTP server over one NkatRuntime: theta applied at γ, γ switchable per request.

HTTP is starlette's routing and responses served by uvicorn, the stack llama-cpp-python's own server runs on;
that server itself is not used, because it builds its own `Llama` from settings, where theta could only be a
`lora_path` at a fixed scale. A request may carry `"nkat_gamma"` (a number, or null for theta off) to use
another γ without reloading anything. A request without `"temperature"` samples at the file's fitted
temperature (`nkat.confidence.temperature`) when it has one, else at llama-cpp-python's default; every
response says which in `"nkat_temperature"`.

Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions (with `"stream": true` as server-sent
events).

Concurrency policy (one llama.cpp context, so one generation at a time; engine/serve/admission.py):
- requests are parsed and checked on uvicorn's event loop; `GET /v1/models` and `GET /health` never wait for
  the generation, so they are answered while one runs;
- llama.cpp's calls block, so a valid chat request waits for the slot and generates in a worker thread: at
  once if nothing is generating, else in a first-come-first-served queue of at most `max_queue` requests;
  beyond that it gets 503 at once, with a JSON error and `Retry-After` (the last generation's duration in
  whole seconds, at least 1);
- a request that waits `queue_timeout_s` without starting gets the same 503; once started, a generation is
  bounded by its `max_tokens` (at most the context size), and a streaming one stops when its client goes away;
- a client must send a request head within REQUEST_TIMEOUT_S of connecting (else it is dropped) and the body
  within as long after it (else 408); messages whose text cannot fit the context are refused before the
  queue (`check_prompt_fits`: a 3 MB prompt once held the slot for seconds of tokenizing).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http import HTTPStatus
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from nkat_gguf.engine.llama.runtime import NkatRuntime
from nkat_gguf.engine.llama.vocab import longest_piece_bytes
from nkat_gguf.engine.serve.admission import Busy, GenerationQueue
from nkat_gguf.engine.serve.heap import map_large_blocks
from nkat_gguf.errors import InputError
from nkat_gguf.format import nkat
from nkat_gguf.format.nkat import check_gamma

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_QUEUE = 16  # requests waiting for the generation slot; more get 503
DEFAULT_QUEUE_TIMEOUT_S = 120.0  # longest wait for the slot before a 503
REQUEST_TIMEOUT_S = 30.0  # longest wait for a request's head once connected, and for its body after the head
MAPPED_BLOCK_BYTES = 1 << 20  # heap blocks this large go back to the system when freed (engine/serve/heap.py)
LINGER_S = 2.0  # longest time spent draining what a client still sends after an unparsable request
GAMMA_FIELD = "nkat_gamma"
TEMPERATURE_FIELD = "nkat_temperature"  # in responses: the temperature used (null: llama-cpp-python's default)
# OpenAI request fields passed on to llama-cpp-python's create_chat_completion; others are ignored
FORWARDED = ("messages", "temperature", "top_p", "top_k", "min_p", "typical_p", "stop", "seed", "max_tokens",
             "presence_penalty", "frequency_penalty", "repeat_penalty", "response_format", "tools", "tool_choice")
_UNSET = object()


class RequestError(HTTPException):
    """A request the client must fix: answered with `status` (400 unless said) and OpenAI's error body."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(status, message)


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
        self.created = int(time.time())
        self.queue = GenerationQueue(max_queue, queue_timeout_s)
        # worker threads for the slot's holder, its waiters and one request being refused: the queue bounds them
        self._workers = anyio.CapacityLimiter(max_queue + 2)
        self.longest_piece_bytes = longest_piece_bytes(runtime.llm)
        map_large_blocks(MAPPED_BLOCK_BYTES)  # else the heap keeps the request bodies it read
        try:
            self._socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        app = Starlette(routes=[Route("/v1/models", self._models), Route("/health", self._health),
                                Route("/v1/chat/completions", self._chat, methods=["POST"])],
                        exception_handlers={HTTPException: _http_error, Busy: _busy, Exception: _server_error})
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, http=_Protocol, lifespan="off", access_log=not quiet,
                                                      log_level="error" if quiet else "info"))
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._socket.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"

    def serve_forever(self) -> None:
        """Serve in this thread until close() is called from another one (or KeyboardInterrupt)."""
        self._uvicorn.run(sockets=[self._socket])

    def start(self) -> None:
        """Serve in a background thread; close() stops it."""
        self._thread = threading.Thread(target=self.serve_forever, name="nkat-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (after the requests in progress) and release the socket."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._socket.close()

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

    async def _models(self, request: Request) -> Response:
        return JSONResponse(self.models())

    async def _health(self, request: Request) -> Response:
        return JSONResponse(self.health())

    async def _chat(self, request: Request) -> Response:
        body = await read_json(request)
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
        if not body.get("stream"):
            return JSONResponse(await self._in_worker(self._completion, gamma, kwargs))
        events = self._events(gamma, kwargs)
        return _EventStream(await self._in_worker(next, events), events, self._workers)

    async def _in_worker(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(function, *args, limiter=self._workers)
        except (ValueError, TypeError) as exc:  # llama-cpp-python's way of refusing arguments
            raise RequestError(str(exc)) from None

    def _completion(self, gamma: Any, kwargs: dict) -> dict:
        with self.queue.slot():
            extra = self._use_gamma(gamma, kwargs)
            return {**self.runtime.llm.create_chat_completion(**kwargs), **extra}

    def _events(self, gamma: Any, kwargs: dict) -> Iterator[bytes]:
        """One streamed completion as server-sent events, holding the slot from the first `next()` to the end.

        The first `next()` takes the slot and makes the first chunk, so whatever refuses the request (Busy, an
        argument llama-cpp-python rejects) is raised before any header is sent; a later error goes in the stream.
        """
        with self.queue.slot():
            extra = self._use_gamma(gamma, kwargs)
            chunks = self.runtime.llm.create_chat_completion(**kwargs, stream=True)
            try:
                yield _event({**next(chunks), **extra})
                try:
                    for chunk in chunks:
                        yield _event({**chunk, **extra})
                except Exception as exc:  # the headers are gone: report in the stream
                    yield _event({"error": {"message": str(exc), "type": "server_error"}})
            finally:
                chunks.close()  # inside the slot: a client that left must not leave it half-run
        yield b"data: [DONE]\n\n"

    def _use_gamma(self, gamma: Any, kwargs: dict) -> dict:
        """Switch to the request's γ (the server's default when it has none); the fields every answer carries."""
        gamma = self.default_gamma if gamma is _UNSET else gamma
        if gamma != self.runtime.gamma:
            try:
                self.runtime.set_gamma(gamma)  # also empties the KV cache computed under the old γ
            except InputError as exc:
                raise RequestError(str(exc)) from None
        return {GAMMA_FIELD: self.runtime.gamma, TEMPERATURE_FIELD: kwargs.get("temperature"), "model": self.model_id}


async def read_json(request: Request) -> Any:
    """The request's JSON body, within MAX_BODY_BYTES and REQUEST_TIMEOUT_S (uvicorn has checked Content-Length)."""
    if "transfer-encoding" in request.headers:
        raise RequestError("send the body with a Content-Length, not Transfer-Encoding", HTTPStatus.LENGTH_REQUIRED)
    length = int(request.headers.get("content-length", 0))
    if length > MAX_BODY_BYTES:
        raise RequestError(f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    if length == 0:
        raise RequestError(f"request body must be 1 to {MAX_BODY_BYTES} bytes with a Content-Length")
    try:
        with anyio.fail_after(REQUEST_TIMEOUT_S):
            raw = await request.body()
    except TimeoutError:
        raise RequestError(f"the request body did not arrive within {REQUEST_TIMEOUT_S:g} s",
                           HTTPStatus.REQUEST_TIMEOUT) from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(f"request body is not JSON: {exc}") from None


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


def _event(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events made one by one in a worker thread. However the stream ends (a client that left
    included: starlette then stops sending), the generator is closed, which frees the generation slot it holds."""

    def __init__(self, first: bytes, events: Iterator[bytes], workers: anyio.CapacityLimiter):
        self.events, self.workers = events, workers
        super().__init__(self._follow(first), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _follow(self, first: bytes) -> AsyncIterator[bytes]:
        yield first
        while (event := await anyio.to_thread.run_sync(next, self.events, None, limiter=self.workers)) is not None:
            yield event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.events.close, limiter=self.workers)


def _error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "code": status}}


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """RequestError, and starlette's own refusals: 404 for a path, 405 for a method."""
    message = exc.detail if isinstance(exc, RequestError) else f"{exc.detail}: {request.method} {request.url.path}"
    return JSONResponse(_error_body(exc.status_code, message), exc.status_code, exc.headers)


async def _busy(request: Request, exc: Busy) -> Response:
    return JSONResponse(_error_body(503, str(exc)), 503, {"Retry-After": str(exc.retry_after_s)})


async def _server_error(request: Request, exc: Exception) -> Response:  # one failed request must not stop the server
    return JSONResponse(_error_body(500, f"{type(exc).__name__}: {exc}"), 500)


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1, but a request it cannot parse (a bad Content-Length, a broken request line or header)
    gets the JSON error every other refusal gets, then a lingering close; and a silent client is dropped.

    uvicorn answers those itself in plain text and closes at once; closing a socket that holds unread input
    makes the kernel send RST, and a client still sending its body then loses the answer. So here the answer
    is followed by a shutdown of the sending side and by reading and dropping what the client still sends,
    for at most LINGER_S. (A request refused by the app before its body is read needs none of this: uvicorn
    goes on reading and dropping that body after the answer.)
    """

    _lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.loop.call_later(REQUEST_TIMEOUT_S, self._drop_if_silent)

    def _drop_if_silent(self) -> None:
        """uvicorn waits for a first request head without end: a client that sent none in time is dropped."""
        if self.cycle is None:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(_error_body(400, msg)).encode()
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self._lingering = True
        self.transport.write_eof()
        self.transport.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._lingering:
            super().data_received(data)


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
