"""A weight's weighted residual at each candidate type, quantized weight by weight with ggml's row quantizer.

What `llama_model_quantize` writes for one weight at one type is `ggml_quantize_chunk` over its rows with the
weight's importance row (`tests/test_theta_fit.py` holds the two byte for byte), so a candidate type costs
one weight's quantization at a time, not a whole-file pass per type with its file on disk and every candidate
tensor mapped (six whole-file quantizes were the θ step's largest cost on a 1.5B). The types are quantized on
threads (ctypes releases the GIL).

Rows are quantized independently, so a weight of more than CANDIDATE_ROWS rows is measured on evenly spaced
rows and its error scaled by the base type's error on all rows over its error on the same rows: a ratio
estimate, in which the spread of the sampled rows cancels. Smaller weights are measured on every row, exactly.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType

from nkat_gguf.engine.llama.quantize import quantize_rows
from nkat_gguf.format.tensors import TensorSource

CANDIDATE_ROWS = 1024  # rows of a weight quantized at each candidate type; all of a weight with fewer


def sampled_rows(n_rows: int) -> slice:
    """Every k-th row, k the smallest that leaves at most CANDIDATE_ROWS (k = 1: all rows)."""
    return slice(None, None, -(-n_rows // CANDIDATE_ROWS))


def diagonal_error(weight: np.ndarray, dequantized: np.ndarray, scale: np.ndarray) -> float:
    """‖(W − Q)·S‖² with S² = `scale` (E[x²] per input column, or ones): the allocation's residual at a type."""
    residual = (weight - dequantized).astype(np.float64)
    return float((residual ** 2 @ scale).sum())


def requantized(source: TensorSource, name: str, values: np.ndarray, ggml_type: GGMLQuantizationType,
                imatrix: np.ndarray | None) -> np.ndarray:
    """Rows `values` of `source`'s weight `name` as llama.cpp writes them at `ggml_type`, dequantized; a weight
    already of that type is kept as it is, as llama_model_quantize copies it."""
    if source.info(name).type == ggml_type:
        return values
    raw = quantize_rows(name, values, ggml_type, imatrix)
    return quants.dequantize(raw.reshape(values.shape[0], -1), ggml_type).reshape(values.shape)


def candidate_errors(source: TensorSource, name: str, weight: np.ndarray, at_base: np.ndarray,
                     types: list[GGMLQuantizationType], imatrix: np.ndarray | None, scale: np.ndarray,
                     threads: int = 0) -> dict[GGMLQuantizationType, float]:
    """The diagonal error of `weight` (W_ref) at each of `types`, quantized from `source` (the model file
    llama.cpp quantizes) with the weight's importance row; `at_base`: the weight at its base type."""
    if not types:
        return {}
    rows = sampled_rows(weight.shape[0])
    values, sample = source.dequantize(name, rows), weight[rows]

    def error(ggml_type: GGMLQuantizationType) -> float:
        return diagonal_error(sample, requantized(source, name, values, ggml_type, imatrix), scale)

    with ThreadPoolExecutor(min(len(types), threads or os.cpu_count() or 1)) as pool:
        errors = dict(zip(types, pool.map(error, types)))
    if rows.step == 1:
        return errors
    on_sample = diagonal_error(sample, at_base[rows], scale)
    factor = diagonal_error(weight, at_base, scale) / on_sample if on_sample > 0 else 1.0
    return {t: e * factor for t, e in errors.items()}
