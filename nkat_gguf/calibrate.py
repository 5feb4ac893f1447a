"""Calibration: the input statistics E[x^2] each weight sees on the calibration text.

One pass of the PyTorch reference forward serves two uses: the activation weighting of theta's SVD
and llama.cpp's importance matrix for quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError
from .native_log import captured_llama_log
from .texts import Text
from .weights import TensorSource

CALIBRATION_SEQUENCES = 8
CALIBRATION_LENGTH = 256


@dataclass(frozen=True)
class Calibration:
    mean_squares: dict[str, np.ndarray]  # weight name -> E[x^2] per input column
    tokens: int
    text_sha256: str
    text_source: str


def tokenize(model_path: Path, text: str) -> list[int]:
    """llama.cpp's own tokenizer for the model (vocab only, nothing else loaded); BOS per the model's flag."""
    import llama_cpp

    with captured_llama_log() as log:
        try:
            vocab = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        except ValueError:
            vocab = None
    if vocab is None:
        raise InputError(f"llama.cpp cannot load the tokenizer of {model_path.name}: {log.reason('')}")
    try:
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(vocab.model)))
        return vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    finally:
        vocab.close()


def calibration_sequences(tokens: list[int], n_seq: int = CALIBRATION_SEQUENCES,
                          length: int = CALIBRATION_LENGTH) -> list[list[int]]:
    """n_seq consecutive windows of `length` tokens from the start of the calibration text."""
    if len(tokens) < length:
        raise InputError(f"calibration text has {len(tokens)} tokens; at least {length} are needed")
    n = min(n_seq, len(tokens) // length)
    return [tokens[i * length:(i + 1) * length] for i in range(n)]


def calibrate(source: TensorSource, weights: Callable[[str], np.ndarray], model_path: Path, text: Text,
              progress: bool = True) -> Calibration:
    """Run the reference forward (with the reference weights) over the calibration windows."""
    from engine.reference import LlamaReference

    sequences = calibration_sequences(tokenize(model_path, text.content))
    reference = LlamaReference(source, weights=weights)
    stats = reference.input_mean_squares(sequences)
    return Calibration(stats, sum(len(s) for s in sequences), text.sha256, text.source)
