"""optimizer pieces without llama.cpp: the score, the options, the search space, rank truncation, heartbeats."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from nkat_gguf.convert import ConvertOptions
from nkat_gguf.errors import InputError
from nkat_gguf.math.theta import LowRank, quantize_int8
from nkat_gguf.optimizer.options import (
    OptimizeOptions,
    check_options,
    parse_gamma_range,
    parse_ranks,
    rank_choices,
    seed_point,
)
from nkat_gguf.optimizer.score import SCORE_DEFINITION, slowdown, tpe_score
from nkat_gguf.optimizer.storage import open_storage
from nkat_gguf.optimizer.study import first_points, quiet_optuna, run_trials


def options(**changes: object) -> OptimizeOptions:
    return OptimizeOptions(convert=ConvertOptions(input=Path("m.gguf"), output=Path("unused")),
                           output_dir=Path("out"), **changes)


def test_score_is_inverse_ppl_over_one_plus_log_slowdown() -> None:
    assert tpe_score(20.0, 0.0) == 1 / 20.0  # the baseline: exactly ppl^-1, not a division by log10(1) = 0
    assert tpe_score(20.0, 0.25) == pytest.approx(1 / 20.0 / (1 + math.log10(1.25)))
    assert tpe_score(20.0, 0.5) < tpe_score(20.0, 0.25) < tpe_score(20.0, 0.0)
    assert tpe_score(19.0, 0.0) > tpe_score(20.0, 0.0)
    assert slowdown(100.0, 80.0) == pytest.approx(0.25)
    assert slowdown(100.0, 125.0) == 0.0  # faster than the baseline (noise) is no slowdown
    for bad in ((0.0, 0.0), (-1.0, 0.1), (10.0, -0.1)):
        with pytest.raises(ValueError):
            tpe_score(*bad)
    assert "CALIBRATION" in SCORE_DEFINITION["ppl"] and "log10(1 + lambda_theta)" in SCORE_DEFINITION["formula"]


@pytest.mark.parametrize("mode, trials, expected", [("quick", None, 12), ("full", None, 100), ("custom", 7, 7)])
def test_trial_totals(mode: str, trials: int | None, expected: int) -> None:
    assert check_options(options(mode=mode, trials=trials)) == expected


@pytest.mark.parametrize("changes, message", [
    ({"mode": "fast"}, "unknown --mode 'fast'"),
    ({"mode": "custom"}, "needs --trials"),
    ({"mode": "custom", "trials": 0}, "--trials must be at least 1"),
    ({"mode": "quick", "trials": 3}, "--trials is for --mode custom"),
    ({"ranks": ()}, "--ranks is empty"),
    ({"ranks": (0, 2)}, "--ranks must be >= 1"),
    ({"gamma_range": (0.99, 0.9)}, "inverted"),
    ({"gamma_range": (-0.1, 0.9)}, "--gamma-range values"),
    ({"gamma_range": (0.9, math.nan)}, "--gamma-range values"),
    ({"chunks": 0}, "--chunks must be at least 1"),
    ({"n_ctx": 8}, "--ctx must be at least"),
])
def test_bad_options_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        check_options(options(**changes))


def test_parsing() -> None:
    assert parse_ranks("8,2, 4,2") == (2, 4, 8)
    assert parse_ranks(",") == ()
    assert parse_gamma_range("0.5,1.25") == (0.5, 1.25)
    assert check_options(options(gamma_range=(0.0, 0.0))) == 12  # any range >= 0, even a single point
    for text in ("a,b", "1", "1,2,3"):
        with pytest.raises(InputError, match="--gamma-range"):
            parse_gamma_range(text)
    with pytest.raises(InputError, match="--ranks"):
        parse_ranks("2,four")


def test_baseline_then_seed_point_are_enqueued_first() -> None:
    assert rank_choices((2, 4)) == [0, 2, 4]
    assert first_points(options()) == [{"rank": 0}, {"rank": 4, "gamma": 0.97}]
    # with convert's default in the space, it is tried third
    searched = options(byte_budgets=("1%", "3%"), theta_weights=(0, 15), outtypes=("Q4_0", "IQ4_NL"))
    assert first_points(searched) == [
        {"outtype": "Q4_0", "byte_budget": "none", "rank": 0},
        {"outtype": "Q4_0", "byte_budget": "none", "rank": 4, "gamma": 0.97},
        {"outtype": "IQ4_NL", "byte_budget": "3%", "theta_weights": 15, "gamma": 0.97}]
    assert len(first_points(options(byte_budgets=("1%",)))) == 2  # convert's default is not in this space
    # a space without the seed's point gets its nearest point instead
    assert seed_point((2, 6, 16), (0.5, 0.8)) == (2, 0.8)
    assert seed_point((5, 8), (0.98, 1.2)) == (5, 0.98)


def test_truncating_int8_theta_equals_quantizing_the_truncated_fit() -> None:
    rng = np.random.default_rng(0)
    fit = LowRank(rng.normal(size=(48, 8)).astype(np.float32), rng.normal(size=(8, 40)).astype(np.float32))
    for rank in (1, 3, 8):
        cut, direct = quantize_int8(fit).truncate(rank), quantize_int8(fit.truncate(rank))
        for name in ("a", "a_scale", "b", "b_scale"):
            np.testing.assert_array_equal(getattr(cut, name), getattr(direct, name))
        assert cut.rank == rank


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() stands in for a worker's trial
def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried(tmp_path: Path) -> None:
    """Optuna samples before it starts a trial's heartbeat; a worker killed then leaves a silent RUNNING trial."""
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_int("x", 0, 9)
        trial.set_user_attr("tpe_score", float(x))
        return float(x)

    finished: list[list[int]] = []
    with quiet_optuna():
        storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
        study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
        orphan = study.ask()  # RUNNING with no heartbeat, as a worker killed while sampling leaves it
        orphan.suggest_int("x", 0, 9)
        worker = threading.Thread(target=lambda: finished.append(run_trials(study, storage, objective, 1, False)),
                                  daemon=True)
        worker.start()
        worker.join(timeout=120)
    assert finished, "run_trials waited for a trial nobody will finish"
    first, retry = study.trials
    assert first.state == TrialState.FAIL
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["failed_trial"] == 0
    assert retry.params == first.params and finished == [[1]]
