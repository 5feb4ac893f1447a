"""One trial: choose convert's knobs (base type, byte budget, θ weights, rank, θ budget) and γ, switch the model to
them, measure perplexity, return the score.

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
from nkat_gguf.optimizer.options import NO_BUDGET, OptimizeOptions, ThetaConfig, rank_choices
from nkat_gguf.optimizer.score import slowdown, tpe_score


def suggest(trial: optuna.Trial, opts: OptimizeOptions) -> tuple[ThetaConfig, float | None]:
    """Each knob only where the search has a choice for it: the base type; a byte budget (or none); under a byte
    budget its θ-weight count, else the rank from {0} ∪ ranks and a θ budget (or none) with its θ-weight count;
    γ only when θ is on (θ off has nothing to scale)."""
    outtype = trial.suggest_categorical("outtype", list(opts.base_types)) if len(opts.base_types) > 1 else None
    byte_budget = trial.suggest_categorical("byte_budget", [NO_BUDGET, *opts.byte_budgets]) \
        if opts.byte_budgets else NO_BUDGET
    if byte_budget != NO_BUDGET:
        weights = trial.suggest_categorical("theta_weights", list(opts.theta_weights)) if opts.theta_weights else None
        config = ThetaConfig(0, theta_weights=weights, outtype=outtype, byte_budget=byte_budget)
    else:
        rank = trial.suggest_categorical("rank", rank_choices(opts.ranks))
        if not rank:
            return ThetaConfig(0, outtype=outtype), None
        budget = trial.suggest_categorical("theta_budget", [NO_BUDGET, *opts.theta_budgets]) \
            if opts.theta_budgets else NO_BUDGET
        weights = trial.suggest_categorical("theta_weights", list(opts.theta_weights)) \
            if budget != NO_BUDGET and opts.theta_weights else None
        config = ThetaConfig(rank, budget, weights, outtype)
    return config, trial.suggest_float("gamma", *opts.gamma_range) if config.theta_on else None


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
    opts: OptimizeOptions
    speeds: Callable[[ThetaConfig], tuple[float, float]]  # generation tokens/s: (theta off, this configuration)
    worker: str = field(default_factory=_worker)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        config, gamma = suggest(trial, self.opts)
        known = measured_before(trial.study, trial.params)
        if known is None:
            self.model.apply(config, gamma)
            result = perplexity(self.model.runtime.llm, self.tokens, self.opts.n_ctx, self.opts.chunks, progress=False)
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
        return (ppl, lam) if self.opts.pareto else score
