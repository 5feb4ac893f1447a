"""The fitted softmax temperature of a loaded model: T minimising NLL on a calibration text.

Shared by `convert --calibrate-temperature` (which stores T in the file) and `qc calibration` (which
measures ECE and the rest before and after T). The scored positions are `engine.perplexity`'s, i.e.
exactly llama-perplexity's.
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp
import numpy as np

from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.errors import InputError
from nkat_gguf.format.nkat import CalibratedTemperature
from nkat_gguf.math.confidence import fit_temperature
from nkat_gguf.texts import Text


@dataclass(frozen=True)
class CalibrationSettings:
    n_ctx: int = 512
    n_chunks: int = 16  # evaluation-split chunks scored
    calib_chunks: int = 2  # calibration-split chunks T is fitted on (their logits are held: ~50 MB each)
    progress: bool = True


def fit_llm_temperature(llm: llama_cpp.Llama, text: Text, settings: CalibrationSettings,
                        gamma: float | None) -> CalibratedTemperature:
    """T minimising NLL over the scored positions of the first `calib_chunks` chunks of `text`."""
    logits: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    result = perplexity(llm, long_enough(tokenize_text(llm, text.content), text, settings.n_ctx), settings.n_ctx,
                        settings.calib_chunks,
                        settings.progress, on_chunk=lambda z, y: (logits.append(z.copy()), targets.append(y.copy())))
    return CalibratedTemperature(fit_temperature(logits, targets), text.sha256, result.tokens_scored, gamma)


def long_enough(tokens: list[int], text: Text, n_ctx: int) -> list[int]:
    """`tokens` when they fill at least one chunk; else one line naming the text."""
    if len(tokens) < n_ctx:
        raise InputError(f"text too short: {text.source} has {len(tokens)} tokens, one chunk needs {n_ctx} "
                         "(pass a longer text or a smaller --ctx)")
    return tokens
