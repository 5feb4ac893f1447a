"""nkat-gguf optimize as a process: bad input in one line, and a study that survives kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nkat_gguf.convert import ConvertOptions
from nkat_gguf.engine.llama.runtime import NkatRuntime
from nkat_gguf.optimizer.study import optimize_convert

CLI = [sys.executable, "-m", "nkat_gguf.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("extra, message", [
    (["--mode", "fast"], "unknown --mode 'fast'"),
    (["--mode", "custom", "--trials", "0"], "--trials must be at least 1"),
    (["--ranks", ","], "--ranks is empty"),
    (["--gamma-range", "0.99,0.90"], "--gamma-range 0.99,0.9 is inverted"),
    (["--storage", "postgresql://nkat:secret@127.0.0.1:1/nkat"], "cannot open storage postgresql://nkat:***@"),
])
def test_bad_input_is_one_line(extra: list[str], message: str, tiny_f32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("optimize", "-m", str(tiny_f32), "-o", str(out), *extra)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert "secret" not in proc.stderr
    assert not out.exists()  # refused before anything was written


def _trial_states(db: Path) -> list[tuple[int, str]]:
    """(number, state) of every trial, read straight from the SQLite file; [] while it is not readable."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("SELECT number, state FROM trials").fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or a write in progress
        return []


def _running_after_one_finished(db: Path) -> int | None:
    rows = _trial_states(db)
    running = [n for n, state in rows if state == "RUNNING"]
    return running[0] if running and any(state == "COMPLETE" for _, state in rows) else None


def _freeze_mid_trial(db: Path, proc: subprocess.Popen, timeout: float = 300.0) -> int:
    """Stop the worker (SIGSTOP) at a moment when a trial is running after at least one finished.

    Frozen, the process cannot finish the trial, so what the storage says then is what kill -9 leaves.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if _running_after_one_finished(db) is not None:
            proc.send_signal(signal.SIGSTOP)
            os.waitpid(proc.pid, os.WUNTRACED)  # returns once the process is stopped
            frozen = _running_after_one_finished(db)
            if frozen is not None:
                return frozen
            proc.send_signal(signal.SIGCONT)  # it finished the trial meanwhile: try again
        time.sleep(0.05)
    raise AssertionError("no trial was running within the timeout")


def test_kill_9_mid_study_then_rerun_keeps_finished_trials_and_carries_on(tiny_f32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["optimize", "-m", str(tiny_f32), "-o", str(out), "--outtype", "Q4_0", "--mode", "custom", "--trials", "5",
            "--ranks", "2", "--ctx", "512", "--chunks", "6", "--eval-chunks", "1", "--n-gen", "16",
            "--speed-repetitions", "1", "--threads", "2", "--json"]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _freeze_mid_trial(out / "optuna_study.db", proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    storage = f"sqlite:///{out / 'optuna_study.db'}"
    before = {t.number: t for t in optuna.load_study(study_name="nkat-optimize", storage=storage).trials}
    assert before[victim].state == TrialState.RUNNING  # killed mid-trial: nobody marked it

    rerun = run_cli(*args)

    assert rerun.returncode == 0, rerun.stderr[-2000:]
    trials = {t.number: t for t in optuna.load_study(study_name="nkat-optimize", storage=storage).trials}
    assert trials[victim].state == TrialState.FAIL  # the heartbeat check failed the dead trial
    for number, old in before.items():
        if old.state == TrialState.COMPLETE:  # finished trials are kept as they were
            assert trials[number].state == TrialState.COMPLETE and trials[number].value == old.value
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    # Whatever of its point was chosen (enqueued, or sampled before the kill), the retry measures again.
    chosen = before[victim].system_attrs.get("fixed_params") or before[victim].params
    assert chosen.items() <= retried[0].params.items()
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == 5
    summary = json.loads(rerun.stdout)
    assert summary["trials"]["complete"] == 5 and summary["trials"]["fail"] == 1
    assert set(summary["trials_run_here"]) == {n for n in trials if n not in before}


def test_convert_optimize_rank_writes_the_best_model_to_output(tiny_f32: Path, tmp_path: Path) -> None:
    output = tmp_path / "tiny.nkat.gguf"
    summary = optimize_convert(ConvertOptions(input=tiny_f32, output=output, outtype="Q4_0", progress=False),
                               n_ctx=64, chunks=1, eval_chunks=1, speed_repetitions=1, n_gen=16)
    assert summary["trials"]["complete"] == 12  # --mode quick
    assert summary["files"]["model"] == str(output)
    report = json.loads(Path(summary["files"]["report"]).read_text())
    assert Path(summary["files"]["report"]).parent == tmp_path / "tiny.nkat.gguf.optimize"
    with NkatRuntime(output) as runtime:
        assert (runtime.theta.rank if runtime.has_theta else 0) == report["config"]["rank"]
