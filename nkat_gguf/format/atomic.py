"""Atomic output: write to a temporary name beside the target, fsync, rename on success, delete on failure.

Temporaries are named `.nkat-tmp-<pid>-...`, so that what a killed run (kill -9, power cut) left behind
is recognisable: the next run that writes into the same directory removes those whose process is gone
and that are older than itself (`remove_stale`). The file is fsynced before the rename and the
directory after it, so a finished output survives a power cut, and a half-written one never has the
final name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from nkat_gguf.errors import InputError

TMP_PREFIX = ".nkat-tmp-"
_STALE = re.compile(rf"^{re.escape(TMP_PREFIX)}(\d+)-")
_STARTED = time.time()  # entries older than this process and not its own may be a killed run's


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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(directory: Path) -> list[Path]:
    """Remove temporaries a killed run left in `directory`: ours by name, their process gone, older than us."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry.name)
        if not match or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        try:
            if entry.lstat().st_mtime >= _STARTED:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue  # another run cleaned it first, or it is not ours to remove
    return removed


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it to `path` only if the block succeeds."""
    path = Path(path)
    check_writable_dir(path.parent.resolve())
    remove_stale(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def work_dir(parent: Path, label: str) -> Iterator[Path]:
    """A temporary directory in `parent` for intermediate files (`.nkat-tmp-<pid>-<label>-...`), always removed."""
    parent = Path(parent)
    remove_stale(parent)
    path = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-{label}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def output_directory(directory: Path) -> Iterator[Path]:
    """`make_output_dir`, undone if the block fails and this call created the directory (left empty)."""
    directory = Path(directory)
    created = not directory.exists()
    resolved = make_output_dir(directory)
    try:
        yield resolved
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: never removes anything else
        raise
