"""Two optimize workers on one study in a real PostgreSQL server: every trial recorded once, none lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.pg_server import postgres_url  # noqa: F401  (fixture)

TRIALS = 10


def test_two_workers_share_one_study(postgres_url: str, tiny_f32: Path, tmp_path: Path) -> None:  # noqa: F811
    workers = []
    for seed in (1, 2):  # each worker its own seed, as docs/OPTIMIZER.md says
        args = ["optimize", "-m", str(tiny_f32), "-o", str(tmp_path / f"worker{seed}"), "--storage", postgres_url,
                "--study-name", "shared", "--seed", str(seed), "--outtype", "Q4_0", "--mode", "custom",
                "--trials", str(TRIALS), "--ctx", "64", "--chunks", "1", "--eval-chunks", "1", "--n-gen", "16",
                "--speed-repetitions", "1", "--threads", "1", "--json"]
        workers.append(subprocess.Popen([sys.executable, "-m", "nkat_gguf.cli", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
    results = []
    for proc in workers:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
        results.append((proc.pid, json.loads(stdout)))

    trials = optuna.load_study(study_name="shared", storage=postgres_url).trials
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # one record per trial number, no gaps
    assert all(t.state == TrialState.COMPLETE for t in trials)  # none lost or left running
    # Workers starting their last trials together may each add one; nothing else exceeds the total.
    assert TRIALS <= len(trials) <= TRIALS + 1
    ran = [set(summary["trials_run_here"]) for _, summary in results]
    assert ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == set(numbers)  # each trial run by exactly one worker
    for pid, summary in results:
        for number in summary["trials_run_here"]:
            assert trials[number].user_attrs["measurement"]["worker"].endswith(f":{pid}")
        assert summary["storage"] == postgres_url and summary["trials"]["complete"] == len(trials)
    assert trials[0].params == {"rank": 0} and trials[1].params == {"rank": 4, "gamma": 0.97}  # enqueued once
