"""One trial: choose (rank, γ), switch the loaded model to it, measure perplexity, return the score.

The objective only measures and records. Everything a report needs goes into the trial's user
attributes, so the output files are derived from the storage alone, whichever worker ran the trial.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from nkat_gguf.engine.perplexity import perplexity
from nkat_gguf.optimizer.base_model import SearchModel
from nkat_gguf.optimizer.options import rank_choices
from nkat_gguf.optimizer.score import slowdown, tpe_score


def suggest(trial: optuna.Trial, ranks: tuple[int, ...], gamma_range: tuple[float, float]) -> tuple[int, float | None]:
    """rank from {0} ∪ ranks; γ only when theta is on (rank 0 has nothing to scale)."""
    rank = trial.suggest_categorical("rank", rank_choices(ranks))
    return rank, (trial.suggest_float("gamma", *gamma_range) if rank else None)


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
    speeds: dict[int, float]  # generation tokens/s by rank, 0 = theta off
    pareto: bool
    worker: str = field(default_factory=_worker)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        rank, gamma = suggest(trial, self.ranks, self.gamma_range)
        known = measured_before(trial.study, trial.params)
        if known is None:
            self.model.apply(rank, gamma)
            result = perplexity(self.model.runtime.llm, self.tokens, self.n_ctx, self.chunks, progress=False)
            ppl = result.ppl
            measured = {"ppl_stderr": result.ppl_stderr, "tokens_scored": result.tokens_scored,
                        "ppl_seconds": result.seconds, "reused_from": None}
        else:
            ppl = known.user_attrs["ppl"]
            measured = dict(known.user_attrs["measurement"], reused_from=known.number)
        lam = slowdown(self.speeds[0], self.speeds[rank])
        score = tpe_score(ppl, lam)
        trial.set_user_attr("ppl", ppl)
        trial.set_user_attr("slowdown", lam)
        trial.set_user_attr("tpe_score", score)
        trial.set_user_attr("measurement", {**measured, "tg_baseline": self.speeds[0], "tg_theta": self.speeds[rank],
                                            "worker": self.worker})
        return (ppl, lam) if self.pareto else score
