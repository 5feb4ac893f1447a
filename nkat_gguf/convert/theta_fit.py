"""The θ step of convert: fit every weight's correction to its quantization residual, one way or another.

- `diag`: the SVD of E·S, S = sqrt(E[x²] + damping·mean) per input column (inputs treated as uncorrelated).
- `whiten`: the SVD of E·L, L·Lᵀ = E[x xᵀ] + damping·mean(diag)·I: the exact minimiser of the expected
  output error. Inputs wider than the calibration's second moments (none on the default model) fall
  back to `diag`.
- `rounds` > 1 (LoftQ-style joint fit): requantize W_ref − B·A with the importance matrix, refit θ on
  the new residual, and keep per weight the round whose quantized weight + INT8 θ has the lowest
  expected output error. The requantized weights replace llama.cpp's in the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import quants
from tqdm import tqdm

from nkat_gguf.convert.calibrate import Calibration
from nkat_gguf.engine.llama.quantize import quantize_rows
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import TensorSpec, copy_metadata, read_layout, write_gguf
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.limits import DAMPING_RANGE, FIT_METHODS, ROUNDS_RANGE, FitMethod
from nkat_gguf.math.lowrank import theta_from_residual, theta_whitened
from nkat_gguf.math.theta import (
    LowRank,
    ThetaInt8,
    activation_scale,
    damped_cholesky,
    expected_output_error,
    quantize_int8,
)

DEFAULT_DAMPING: dict[FitMethod, float] = {"diag": 0.0, "whiten": 0.01}


@dataclass(frozen=True)
class FitSettings:
    method: FitMethod = "whiten"
    damping: float | None = None  # None: DEFAULT_DAMPING of the method
    rounds: int = 1  # 1: fit θ to llama.cpp's quantization; more: LoftQ-style joint rounds

    @property
    def resolved_damping(self) -> float:
        return DEFAULT_DAMPING[self.method] if self.damping is None else self.damping


def check_fit(method: str, damping: float | None, rounds: int) -> FitSettings:
    """--theta-fit, --theta-damping and --theta-rounds as one FitSettings, or a one-line refusal."""
    if method not in FIT_METHODS:
        raise InputError(f"--theta-fit must be one of {', '.join(FIT_METHODS)}, got {method!r}")
    if damping is not None:
        _check_range("--theta-damping", damping, DAMPING_RANGE)
    _check_range("--theta-rounds", rounds, ROUNDS_RANGE)
    return FitSettings(method, damping, rounds)


def _check_range(option: str, value: float, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise InputError(f"{option} must lie in [{low:g}, {high:g}], got {value}")


@dataclass(frozen=True)
class WeightFit:
    theta: ThetaInt8  # the factors as stored: INT8 with per-component scales, quantized once here
    captured_energy: float
    error: float | None  # expected output error of quantized weight + INT8 θ (diagonal E[x²] when no E[x xᵀ]);
    # None where an allocation cut the factors without recomputing it
    round: int  # 0: θ on llama.cpp's own quantization


class ThetaFitter:
    """Fits one weight at a time; the Cholesky factor of a shared input (q/k/v, gate/up) is computed once
    for consecutive weights and only the latest is kept: one float64 (in, in) factor per input of the
    whole model would outgrow the second moments themselves (8 bytes per entry against their 4)."""

    def __init__(self, rank: int, calibration: Calibration | None, settings: FitSettings):
        self.rank, self.calibration, self.settings = rank, calibration, settings
        # (the second moment, its factor): the moment itself is kept, not its id, since a mapping that reads
        # moments from disk one at a time frees the last, and a new array may get the freed one's id
        self._cholesky: tuple[np.ndarray, np.ndarray] | None = None

    def fit(self, name: str, residual: np.ndarray, rank: int | None = None) -> tuple[LowRank, float]:
        """Factors at `rank` (default: the fitter's) and the share of the weighted residual they capture."""
        cal, damping, rank = self.calibration, self.settings.resolved_damping, rank or self.rank
        if cal is None:
            fit = theta_from_residual(residual, rank)
        elif self.settings.method == "whiten" and name in cal.second_moments:
            fit = theta_whitened(residual, rank, self._factor(name))
        else:
            fit = theta_from_residual(residual, rank, activation_scale(cal.mean_squares[name], damping=damping))
        return fit.factors, fit.captured_energy

    def error(self, name: str, residual: np.ndarray, stored: np.ndarray) -> float:
        """E‖(E − B·A)x‖² with B·A as stored (the dense INT8 product), on the true (undamped) calibration
        statistics."""
        cal = self.calibration
        if cal is not None and name in cal.second_moments:
            return expected_output_error(residual, stored, cal.second_moments[name])
        weight = np.ones(residual.shape[1]) if cal is None else cal.mean_squares[name].astype(np.float64)
        return float(((residual.astype(np.float64) - stored) ** 2 @ weight).sum())

    def _factor(self, name: str) -> np.ndarray:
        moment = self.calibration.second_moments[name]
        if self._cholesky is None or self._cholesky[0] is not moment:
            self._cholesky = None  # freed before the next is computed
            try:
                self._cholesky = moment, damped_cholesky(moment, self.settings.resolved_damping)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self._cholesky[1]


def fit_weights(quantized: TensorSource, weights: Callable[[str], np.ndarray], names: list[str], rank: int,
                calibration: Calibration | None, settings: FitSettings,
                imatrix: dict[str, np.ndarray] | None, progress: bool = True
                ) -> tuple[dict[str, WeightFit], dict[str, np.ndarray]]:
    """(θ per weight, requantized raw tensors for the weights whose best round is not 0)."""
    fitter = ThetaFitter(rank, calibration, settings)
    fits: dict[str, WeightFit] = {}
    replaced: dict[str, np.ndarray] = {}
    for name in tqdm(names, desc=f"theta rank {rank} ({settings.method})", unit="tensor", disable=not progress,
                     leave=False):
        w_ref = weights(name).astype(np.float32)
        residual = w_ref - quantized.dequantize(name)
        factors, captured = fitter.fit(name, residual)
        theta = quantize_int8(factors)
        stored = theta.dequantize().dense()
        best = WeightFit(theta, captured, fitter.error(name, residual, stored), 0)
        ggml_type = quantized.info(name).type
        for round_ in range(1, settings.rounds):
            raw = quantize_rows(name, w_ref - stored, ggml_type, None if imatrix is None else imatrix.get(name))
            residual = w_ref - quants.dequantize(raw, ggml_type).reshape(w_ref.shape)
            factors, captured = fitter.fit(name, residual)
            theta = quantize_int8(factors)
            stored = theta.dequantize().dense()
            error = fitter.error(name, residual, stored)
            if error < best.error:
                best = WeightFit(theta, captured, error, round_)
                replaced[name] = raw.reshape(quantized.raw(name).shape)
        fits[name] = best
    return fits, replaced


def replace_tensors(src: Path, dst: Path, replaced: dict[str, np.ndarray]) -> None:
    """`src` with the raw bytes of some tensors replaced (same types and shapes), everything else copied."""
    layout = read_layout(src)
    source = TensorSource(src, layout)
    specs = [TensorSpec(t.name, tuple(reversed(t.shape)), t.type) for t in layout.tensors]
    write_gguf(dst, copy_metadata(layout), specs, lambda spec: replaced.get(spec.name, source.raw(spec.name)),
               layout.alignment)
