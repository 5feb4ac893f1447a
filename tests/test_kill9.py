"""kill -9 in the middle of writing: nothing ever appears at the destination, and the next run cleans up.

Temporaries are named `.nkat-tmp-<pid>-...`; a later run writing into the same directory removes those
whose process is gone and that are older than itself, and leaves a live process's alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nkat_gguf.format.atomic import TMP_PREFIX, atomic_output, remove_stale

TIMEOUT_S = 300


def debris(directory: Path) -> list[Path]:
    return sorted(directory.glob(TMP_PREFIX + "*")) if directory.exists() else []


def kill_when_staging(args: list[str], directory: Path) -> list[Path]:
    """Start the CLI, SIGKILL it as soon as a temporary of its own shows up in `directory`; that debris."""
    proc = subprocess.Popen([sys.executable, "-m", "nkat_gguf.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not any(str(proc.pid) in p.name for p in debris(directory)):
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no temporary ever appeared"
            time.sleep(0.01)
        time.sleep(0.2)  # well inside the write
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL
    return debris(directory)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def test_convert_killed_leaves_nothing_at_the_destination_and_the_next_run_cleans_up(tiny_f32: Path,
                                                                                      tmp_path: Path) -> None:
    output = tmp_path / "c.nkat.gguf"
    args = ["convert", "--input", str(tiny_f32), "--output", str(output), "--theta-rank", "2", "--threads", "1"]
    left = kill_when_staging(args, tmp_path)
    assert left and not output.exists()
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert output.is_file() and debris(tmp_path) == []


def test_export_killed_leaves_nothing_at_the_destination_and_the_next_run_cleans_up(tiny_nkat: Path,
                                                                                    tmp_path: Path) -> None:
    directory = tmp_path / "ollama"
    args = ["export", "ollama", str(tiny_nkat), "--output-dir", str(directory), "--merged", "--ppl-chunks", "1",
            "--threads", "1"]
    left = kill_when_staging(args, directory)  # the merged model is staged while its perplexity is measured
    assert left and not (directory / "tiny.merged.gguf").exists() and not (directory / "Modelfile").exists()
    proc = run_cli("export", "adapter", str(tiny_nkat), "-o", str(directory / "theta.gguf"))
    assert proc.returncode == 0, proc.stderr
    assert debris(directory) == [] and (directory / "theta.gguf").is_file()


def test_only_dead_older_temporaries_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 3600
    stale = tmp_path / f"{TMP_PREFIX}{dead.pid}-model.gguf.abc.tmp"
    stale_dir = tmp_path / f"{TMP_PREFIX}{dead.pid}-convert-xyz"
    live = tmp_path / f"{TMP_PREFIX}{os.getppid()}-other.gguf.tmp"  # a running process's: never touched
    unrelated = tmp_path / ".model.gguf.tmp"
    stale_dir.mkdir()
    (stale_dir / "quantized.gguf").write_bytes(b"x")
    for path in (stale, live, unrelated):
        path.write_bytes(b"x")
    for path in (stale, stale_dir, live, unrelated):
        os.utime(path, (old, old))
    assert sorted(remove_stale(tmp_path)) == sorted([stale, stale_dir])
    assert live.exists() and unrelated.exists()


def test_atomic_output_removes_its_temporary_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("checks failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        assert tmp.name.startswith(f"{TMP_PREFIX}{os.getpid()}-")
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and list(tmp_path.iterdir()) == [target]
