"""How a command prints its result: JSON or a line of text, never a figure that is NaN or infinity."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable

import click

from nkat_gguf.errors import NkatError


def non_finite(value: Any, where: str = "") -> str | None:
    """The path of the first NaN or infinity in a result (nested dicts and lists), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "result"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if (found := non_finite(item, f"{where}.{key}" if where else str(key))) is not None:
            return found
    return None


def emit(result: dict, as_json: bool, text: Callable[[dict], str]) -> None:
    """Print a result, never one holding NaN or infinity: such a figure is an error, not a measurement."""
    if (where := non_finite(result)) is not None:
        raise NkatError(f"the result has a non-finite value at {where}: the model or its theta produced NaN or "
                        "infinity, so no figure is reported")
    click.echo(json.dumps(result, indent=2, default=str, allow_nan=False) if as_json else text(result))


def command_line() -> str:
    """The command as typed, recorded in reports so a figure can be measured again."""
    return "nkat-gguf " + " ".join(sys.argv[1:])


def progress_wanted(as_json: bool) -> bool:
    """Progress bars go to stderr: shown on a terminal, and in text mode; hidden when JSON is piped."""
    return sys.stderr.isatty() or not as_json
