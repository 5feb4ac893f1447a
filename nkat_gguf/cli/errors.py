"""The one place library errors become what a user reads: one line on stderr and a non-zero exit.

Library code raises the project's typed errors (nkat_gguf/errors.py) or OSError; commands wrap their body
in `fail_cleanly`, and the group class prints every error, usage errors included, as one line.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from nkat_gguf.errors import NkatError


def fail_cleanly(fn: Callable) -> Callable:
    """Turn library errors into one line and exit code 1 (click prints 'Error: ...')."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NkatError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None

    return wrapper


class OneLineErrors(click.Group):
    """Every error, usage errors included, is one line on stderr: 'Error: ... (see nkat-gguf CMD --help)'."""

    def main(self, args: list[str] | None = None, **kwargs: Any) -> Any:
        try:
            result = super().main(args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "nkat-gguf"
            click.echo(f"Error: {exc.format_message()} (see {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)
