"""Admission to the one generation slot: one generation at a time, a bounded FIFO queue, a bounded wait.

One llama.cpp context can run one generation, so requests take turns. Without a bound, every client
beyond the first waits for as long as the ones before it take, and a burst of clients piles up threads
that all hold their sockets open. Here a request either starts at once, waits in a queue of at most
`max_waiting` (first come, first served: `threading.Lock` makes no such promise, and a waiter it keeps
passing over would time out), or is refused at once with `Busy`; a waiter that does not get the slot
within `timeout_s` leaves the queue with `Busy` too. The caller answers `Busy` with 503 and
`Retry-After`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class Busy(Exception):
    """The slot could not be had: the queue is full, or the wait ran past its timeout."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationQueue:
    """At most one holder of the slot, at most `max_waiting` waiters, each waiting at most `timeout_s`."""

    def __init__(self, max_waiting: int, timeout_s: float):
        if max_waiting < 0 or not timeout_s > 0:
            raise ValueError(f"max_waiting must be >= 0 and timeout_s > 0, got {max_waiting}, {timeout_s}")
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._busy = False
        self._last_hold_s = 0.0

    def state(self) -> dict:
        """What a health check reports; read without waiting for the slot."""
        with self._cond:
            return {"generating": self._busy, "waiting": len(self._waiting), "max_queue": self.max_waiting,
                    "queue_timeout_s": self.timeout_s}

    def retry_after_s(self) -> int:
        """Whole seconds a refused client should wait: the last generation's duration, at least 1."""
        return max(1, math.ceil(self._last_hold_s))

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold the generation slot for the `with` block, or raise Busy."""
        ticket = object()
        with self._cond:
            if (self._busy or self._waiting) and len(self._waiting) >= self.max_waiting:
                raise Busy(f"the server is busy: one generation running and {len(self._waiting)} waiting "
                           f"(--max-queue {self.max_waiting})", self.retry_after_s())
            self._waiting.append(ticket)
            got = self._cond.wait_for(lambda: not self._busy and self._waiting[0] is ticket, self.timeout_s)
            if not got:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may be first now
                raise Busy(f"waited {self.timeout_s:g} s in the queue without getting the generation slot",
                           self.retry_after_s())
            self._waiting.popleft()
            self._busy = True
        started = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._last_hold_s = time.monotonic() - started
                self._cond.notify_all()
