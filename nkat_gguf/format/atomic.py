"""Atomic output: write to a temporary file beside the target, rename on success, delete on failure."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nkat_gguf.errors import InputError


def check_writable_dir(directory: Path) -> None:
    """Fail early, with one line, before any long work whose result could not be saved."""
    if not directory.exists():
        raise InputError(f"output directory does not exist: {directory}")
    if not directory.is_dir():
        raise InputError(f"output path's parent is not a directory: {directory}")
    try:  # a real probe: permission bits say nothing for root or read-only file systems
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise InputError(f"output directory is not writable: {directory} ({exc.strerror})") from None


def make_output_dir(directory: Path) -> Path:
    """Create `directory` (and its parents) if needed and check it is writable; its resolved path."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {directory}: {exc.strerror}") from None
    check_writable_dir(directory)
    return directory.resolve()


@contextlib.contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it to `path` only if the block succeeds."""
    path = Path(path)
    check_writable_dir(path.parent.resolve())
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
