"""Calibration: the input statistics E[x^2] each weight sees on the calibration text.

One pass of the PyTorch reference forward serves two uses: the activation weighting of theta's SVD
and llama.cpp's importance matrix for quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from nkat_gguf.engine.reference import LlamaReference
from nkat_gguf.engine.vocab import tokenize
from nkat_gguf.errors import InputError
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.texts import Text

CALIBRATION_SEQUENCES = 8
CALIBRATION_LENGTH = 256


@dataclass(frozen=True)
class Calibration:
    mean_squares: dict[str, np.ndarray]  # weight name -> E[x^2] per input column
    tokens: int
    text_sha256: str
    text_source: str
    # weight name -> E[x xᵀ] of its input, (in, in) float64, one array object per shared input (q/k/v, gate/up),
    # only for inputs at most 8192 wide; empty unless asked for (whitened θ needs it)
    second_moments: dict[str, np.ndarray] = field(default_factory=dict)


def calibration_sequences(tokens: list[int], n_seq: int = CALIBRATION_SEQUENCES,
                          length: int = CALIBRATION_LENGTH) -> list[list[int]]:
    """n_seq windows of `length` tokens spread evenly over the calibration text (non-overlapping).

    Spread rather than taken from the start: the text is sorted by topic, so the first windows
    would all come from the first few topics.
    """
    if len(tokens) < length:
        raise InputError(f"calibration text has {len(tokens)} tokens; at least {length} are needed")
    n = min(n_seq, len(tokens) // length)
    starts = np.linspace(0, len(tokens) - length, n).astype(int) if n > 1 else np.zeros(1, dtype=int)
    return [tokens[s:s + length] for s in starts]


def calibrate(source: TensorSource, weights: Callable[[str], np.ndarray], model_path: Path, text: Text,
              progress: bool = True, second_moments: bool = False, n_seq: int = CALIBRATION_SEQUENCES,
              length: int = CALIBRATION_LENGTH) -> Calibration:
    """Run the reference forward (with the reference weights) over the calibration windows."""
    sequences = calibration_sequences(tokenize(model_path, text.content), n_seq, length)
    reference = LlamaReference(source, weights=weights)
    means, moments = reference.input_statistics(sequences, second_moments)
    return Calibration(means, sum(len(s) for s in sequences), text.sha256, text.source, moments)
