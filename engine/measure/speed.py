"""The one speed-measuring primitive: pp and tg rates of several configurations, interleaved in one process.

Every command that reports speed (bench, compare, the quality table, the optimizer) goes through
`interleaved_rates`, so they all measure the same way: a configuration is a loaded model plus a callable
that switches it on (θ at some γ, or θ off). Rounds visit every configuration once, starting one
configuration later each round, so drift on a shared machine hits all of them alike; the ratios carry
over to another machine, the absolute tokens per second do not. Whenever the model changes from one
run to the next, an untimed warm-up re-warms its caches first.
"""

from __future__ import annotations

import functools
import statistics
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import llama_cpp
import numpy as np
from tqdm import tqdm

from nkat_gguf.engine.measure.bench import BenchResult, DecodeLoop, device_name, summarize
from nkat_gguf.engine.llama.runtime import NkatRuntime
from nkat_gguf.errors import InputError

WARMUP_GEN_TOKENS = 8


@dataclass(frozen=True)
class SpeedSettings:
    """How to time. With `ratio_pairs`, rounds go on past `repetitions` (up to `max_repetitions`) until every
    pair's 95 % interval of its per-round speed ratio is at most ±`ratio_halfwidth` wide."""

    repetitions: int = 3
    n_prompt: int = 512
    n_gen: int = 128
    progress: bool = True
    ratio_pairs: tuple[tuple[str, str], ...] = ()  # (numerator, denominator) configuration names
    ratio_halfwidth: float = 0.03
    max_repetitions: int = 30


@dataclass(frozen=True)
class Configuration:
    """A loaded model and how to switch it to this configuration (e.g. `runtime.set_gamma(γ)`)."""

    llm: llama_cpp.Llama
    activate: Callable[[], None]


# Student's t, two-sided 95 %, by degrees of freedom 1..30 (beyond: the normal's 1.96 is within 2 %)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Mean of the per-round ratios numerator[i] / denominator[i] and its 95 % t-interval.

    Both rates of a round were timed back to back, so a round's ratio cancels the machine's drift that the two
    means alone would carry; the interval is that of the mean of the rounds' ratios.
    """
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    mean = statistics.fmean(ratios)
    half = (_T95[min(len(ratios) - 1, len(_T95)) - 1] * statistics.stdev(ratios) / len(ratios) ** 0.5
            if len(ratios) > 1 else float("inf"))
    return {"ratio": mean, "ci95": [mean - half, mean + half], "halfwidth": half, "rounds": len(ratios)}


def _ratios_settled(pp: dict[str, list[float]], tg: dict[str, list[float]], settings: SpeedSettings) -> bool:
    return all(paired_ratio(runs[a], runs[b])["halfwidth"] <= settings.ratio_halfwidth
               for a, b in settings.ratio_pairs for runs in (pp, tg))


def interleaved_rates(configurations: dict[str, Configuration], settings: SpeedSettings) -> dict[str, dict]:
    """pp and tg tokens/s per configuration: mean, sample sd, the mean latency per generated token, and each
    round's rates (`pp_runs`, `tg_runs`, for `paired_ratio`).

    Switching γ makes llama.cpp rebuild its scheduler at the next decode; one untimed token after every
    switch keeps that out of the timed runs, as llama-bench (which never switches) has it.
    """
    rngs = {name: np.random.default_rng(i) for i, name in enumerate(configurations)}
    pp: dict[str, list[float]] = {name: [] for name in configurations}
    tg: dict[str, list[float]] = {name: [] for name in configurations}
    names = list(configurations)
    previous: str | None = None
    with ExitStack() as stack, tqdm(total=settings.repetitions * len(names), desc="speed", unit="run",
                                    file=sys.stderr, disable=not settings.progress) as bar:
        loops: dict[int, DecodeLoop] = {}  # one per loaded model, its batches reused by every run
        round_ = 0
        while round_ < settings.repetitions or (
                settings.ratio_pairs and round_ < settings.max_repetitions and not _ratios_settled(pp, tg, settings)):
            if round_ >= settings.repetitions:
                bar.total += len(names)
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                config = configurations[name]
                config.activate()
                if id(config.llm) not in loops:
                    loops[id(config.llm)] = stack.enter_context(DecodeLoop(config.llm))
                loop = loops[id(config.llm)]
                if previous is None or configurations[previous].llm is not config.llm:
                    loop.time_prompt(settings.n_prompt, rngs[name])  # warm the model's caches
                    loop.time_generation(WARMUP_GEN_TOKENS, rngs[name])
                elif previous != name:
                    loop.time_generation(1, rngs[name])  # the scheduler rebuild after a γ switch
                previous = name
                pp[name].append(settings.n_prompt / loop.time_prompt(settings.n_prompt, rngs[name]))
                tg[name].append(settings.n_gen / loop.time_generation(settings.n_gen, rngs[name]))
                bar.update()
            round_ += 1
    out = {}
    for name in names:
        pp_mean, pp_sd = summarize(pp[name])
        tg_mean, tg_sd = summarize(tg[name])
        out[name] = {"pp_tokens_per_second": pp_mean, "pp_sd": pp_sd, "tg_tokens_per_second": tg_mean,
                     "tg_sd": tg_sd, "avg_latency_ms": 1000.0 / statistics.harmonic_mean(tg[name]),
                     "pp_runs": pp[name], "tg_runs": tg[name]}
    return out


def gamma_configurations(runtime: NkatRuntime, gammas: dict[str, float | None]) -> dict[str, Configuration]:
    """One runtime at several γ (None: θ off)."""
    return {name: Configuration(runtime.llm, functools.partial(runtime.set_gamma, gamma))
            for name, gamma in gammas.items()}


def interleaved_speed(runtime: NkatRuntime, gammas: dict[str, float | None], settings: SpeedSettings) -> dict:
    """pp and tg tokens/s of one runtime per γ (None: theta off), interleaved."""
    return interleaved_rates(gamma_configurations(runtime, gammas), settings)


def bench(llm: llama_cpp.Llama, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 5,
          progress: bool = True) -> BenchResult:
    """pp{n_prompt} and tg{n_gen} of one loaded model as it is, like llama-bench (after one warm-up)."""
    if repetitions < 1:
        raise InputError(f"repetitions must be at least 1, got {repetitions}")
    rates = interleaved_rates({"model": Configuration(llm, lambda: None)},
                              SpeedSettings(repetitions, n_prompt, n_gen, progress))["model"]
    return BenchResult(
        pp_tokens_per_second=rates["pp_tokens_per_second"], pp_sd=rates["pp_sd"],
        tg_tokens_per_second=rates["tg_tokens_per_second"], tg_sd=rates["tg_sd"],
        avg_latency_ms=rates["avg_latency_ms"], repetitions=repetitions, n_prompt=n_prompt, n_gen=n_gen,
        device=device_name())
