"""`nkat-gguf doctor`: versions, CPU features, the default model and the cache (nkat_gguf.doctor)."""

from __future__ import annotations

import sys

import click

from nkat_gguf.cli import options
from nkat_gguf.cli.output import emit


@click.command()
@options.as_json()
def doctor(as_json: bool) -> None:
    """Check versions, CPU features, the default model and the cache; say what to fix. Exit 1 on a failure."""
    from nkat_gguf.doctor import FAIL, format_checks, run_checks

    checks = run_checks()
    emit({"checks": [c.as_dict() for c in checks]}, as_json, lambda r: format_checks(checks))
    if any(c.status == FAIL for c in checks):
        sys.exit(1)
