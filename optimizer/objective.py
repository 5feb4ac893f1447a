"""One trial: choose (rank[, budget, max weights], γ), switch the loaded model to it, measure perplexity, return the score.

The objective only measures and records. Everything a report needs goes into the trial's user
attributes, so the output files are derived from the storage alone, whichever worker ran the trial.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from nkat_gguf.engine.measure.perplexity import perplexity
from nkat_gguf.optimizer.base_model import SearchModel
from nkat_gguf.optimizer.options import ALL_WEIGHTS, NO_BUDGET, ThetaConfig, rank_choices
from nkat_gguf.optimizer.score import slowdown, tpe_score


def suggest(trial: optuna.Trial, ranks: tuple[int, ...], gamma_range: tuple[float, float],
            budgets: tuple[str, ...] = (), max_weights: tuple[int, ...] = ()) -> tuple[ThetaConfig, float | None]:
    """rank from {0} ∪ ranks; with budgets, a budget (or none: uniform rank) and then an operation budget;
    γ only when theta is on (rank 0 has nothing to scale)."""
    rank = trial.suggest_categorical("rank", rank_choices(ranks))
    if not rank:
        return ThetaConfig(0), None
    budget = trial.suggest_categorical("budget", [NO_BUDGET, *budgets]) if budgets else NO_BUDGET
    weights = (trial.suggest_categorical("max_weights", [ALL_WEIGHTS, *max_weights])
               if budget != NO_BUDGET and max_weights else ALL_WEIGHTS)
    return ThetaConfig(rank, budget, weights), trial.suggest_float("gamma", *gamma_range)


def measured_before(study: optuna.Study, params: dict) -> FrozenTrial | None:
    """A finished trial with the same parameters: perplexity is deterministic, so its figures stand."""
    for done in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if done.params == params and "ppl" in done.user_attrs:
            return done
    return None


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Objective:
    model: SearchModel
    tokens: list[int]  # the calibration split, tokenized once
    n_ctx: int
    chunks: int
    ranks: tuple[int, ...]
    gamma_range: tuple[float, float]
    speeds: Callable[[ThetaConfig], tuple[float, float]]  # generation tokens/s: (theta off, this configuration)
    pareto: bool
    budgets: tuple[str, ...] = ()
    max_weights: tuple[int, ...] = ()
    worker: str = field(default_factory=_worker)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        config, gamma = suggest(trial, self.ranks, self.gamma_range, self.budgets, self.max_weights)
        known = measured_before(trial.study, trial.params)
        if known is None:
            self.model.apply(config, gamma)
            result = perplexity(self.model.runtime.llm, self.tokens, self.n_ctx, self.chunks, progress=False)
            ppl = result.ppl
            measured = {"ppl_stderr": result.ppl_stderr, "tokens_scored": result.tokens_scored,
                        "ppl_seconds": result.seconds, "reused_from": None}
        else:
            ppl = known.user_attrs["ppl"]
            measured = dict(known.user_attrs["measurement"], reused_from=known.number)
        tg_baseline, tg_theta = self.speeds(config)
        lam = slowdown(tg_baseline, tg_theta)
        score = tpe_score(ppl, lam)
        trial.set_user_attr("ppl", ppl)
        trial.set_user_attr("slowdown", lam)
        trial.set_user_attr("tpe_score", score)
        trial.set_user_attr("measurement", {**measured, "tg_baseline": tg_baseline, "tg_theta": tg_theta,
                                            "worker": self.worker})
        return (ppl, lam) if self.pareto else score
