"""Capture what llama.cpp logs, so a failure becomes one line and success stays quiet.

llama-cpp-python routes llama.cpp's log through a Python callback that prints to `sys.stderr`
when its logger level allows; raising the level to DEBUG and redirecting stderr collects it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from llama_cpp import _logger

_GENERIC = re.compile(r"failed to load model|failed to read key-value pairs|failed to initialize")
_PREFIX = re.compile(r"^\s*(\w+: )?(error loading model: )?")  # "llama_model_load: error loading model: "


@dataclass
class LlamaLog:
    text: str = ""
    lines: list[str] = field(default_factory=list)

    def reason(self, default: str) -> str:
        """The most telling line of a failure: the last error-looking line, else `default`."""
        keys = ("error", "failed", "unknown", "invalid", "wrong", "mismatch", "cannot", "unsupported")
        telling = [line for line in self.lines if any(k in line.lower() for k in keys)]
        specific = [line for line in telling if not _GENERIC.search(line)]  # "failed to load model" says nothing
        for line in reversed(specific or telling):
            return " ".join(_PREFIX.sub("", line).split())
        return default


@contextlib.contextmanager
def captured_llama_log() -> Iterator[LlamaLog]:
    log = LlamaLog()
    # NOTSET (before any Llama(verbose=False)) would print every debug line afterwards; ERROR is its quiet level
    old_level = _logger.logger.level or logging.ERROR
    buffer = io.StringIO()
    _logger.logger.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stderr(buffer):
            yield log
    finally:
        # NOTSET would let every later llama.cpp line through; outside a capture only errors print
        _logger.logger.setLevel(old_level or logging.ERROR)
        log.text = buffer.getvalue()
        log.lines = log.text.splitlines()
