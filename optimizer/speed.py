"""Generation speed per rank, the λθ of the score: measured once per study and kept in the storage.

γ does not change the work an adapter costs, only its scale, so speed depends on the rank alone. All
ranks (0 = theta off) are timed in alternation, so machine noise hits them alike; the result is a study
attribute, which a resumed run or another worker reuses. Two workers starting at the same moment may
both measure; the last write wins, and every trial records the speeds it used.
"""

from __future__ import annotations

import functools
import socket

import optuna

from nkat_gguf.engine.measure.speed import Configuration, SpeedSettings, interleaved_rates
from nkat_gguf.optimizer.base_model import SearchModel
from nkat_gguf.optimizer.options import ThetaConfig

SPEED_ATTR = "generation_speed"
SPEED_PROMPT_TOKENS = 64  # pp is recorded for information only; the score uses tg


def rank_speeds(study: optuna.Study, model: SearchModel, ranks: tuple[int, ...], n_gen: int, repetitions: int,
                progress: bool) -> dict[int, float]:
    """Generation tokens/s by rank (0: theta off): the study's stored figures, measured here if none are."""
    stored = study.user_attrs.get(SPEED_ATTR)
    if stored is None:
        model.load(ThetaConfig(0))  # the first base type's uniform file
        configurations = {str(r): Configuration(model.runtime.llm, functools.partial(model.apply, r, 1.0 if r else None))
                          for r in (0, *ranks)}
        settings = SpeedSettings(repetitions=repetitions, n_prompt=SPEED_PROMPT_TOKENS, n_gen=n_gen,
                                 progress=progress)
        rates = interleaved_rates(configurations, settings)
        per_rank = {key: {r: s[key] for r, s in rates.items()}
                    for key in ("tg_tokens_per_second", "tg_sd", "pp_tokens_per_second")}
        stored = {**per_rank, "n_prompt": SPEED_PROMPT_TOKENS, "n_gen": n_gen, "repetitions": repetitions,
                  "measured_by": socket.gethostname()}
        study.set_user_attr(SPEED_ATTR, stored)
    return {int(r): v for r, v in stored["tg_tokens_per_second"].items()}


def config_speed(study: optuna.Study, model: SearchModel, config: ThetaConfig, n_gen: int, repetitions: int,
                 progress: bool) -> tuple[float, float]:
    """(theta off, this configuration) generation tokens/s on its own file, interleaved; measured once per
    configuration.

    A budget's speed depends on how many weights its allocation adapts, which only the allocation knows, and
    another base type or byte budget is another file, so each such configuration is timed against its file with
    theta off the first time a trial uses it, and kept in the storage.
    """
    attr = f"{SPEED_ATTR}:{config.key}"
    stored = study.user_attrs.get(attr)
    if stored is None:
        model.load(config)
        llm = model.runtime.llm
        configurations = {"off": Configuration(llm, functools.partial(model.apply, config.off(), None)),
                          "theta": Configuration(llm, functools.partial(model.apply, config, 1.0))}
        settings = SpeedSettings(repetitions=repetitions, n_prompt=SPEED_PROMPT_TOKENS, n_gen=n_gen,
                                 progress=progress)
        rates = interleaved_rates(configurations, settings)
        stored = {"tg_off": rates["off"]["tg_tokens_per_second"], "tg_theta": rates["theta"]["tg_tokens_per_second"],
                  "theta_weights": len(model.theta(config).tensors), "measured_by": socket.gethostname()}
        study.set_user_attr(attr, stored)
    return stored["tg_off"], stored["tg_theta"]
