"""Wall-clock seconds per named step: the step times convert reports and prints."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimes:
    """`with times.step("quantize"): ...` records that block's seconds under "quantize", in step order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: list[str] = []  # the steps running now, outermost first (for messages about a failure)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self.current.append(name)
        yield
        self.current.pop()
        self.seconds[name] = time.perf_counter() - start

    def rounded(self, digits: int = 3) -> dict[str, float]:
        return {name: round(value, digits) for name, value in self.seconds.items()}
