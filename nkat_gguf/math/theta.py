"""The theta math: residual -> truncated SVD -> antisymmetric generator -> INT8 factors.

Pure numpy functions (the SVD fits, which need torch, are in lowrank.py), shapes in numpy order: a weight W is (out, in) and y = W x.

theta is an element of so(out+in): theta = D - D^T with D = [[0, 2·B·A], [0, 0]]. Acting on the
input embedded as [0; x], its output block is 2·B·A·x, so the star product
    (W ⋆ x) = W·x + ½·γ·(theta ⋆ x) = W·x + γ·B·A·x
applies the rank-r correction B·A in full at γ = 1. theta is determined by (A, B), which are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LowRank:
    """B (out, r) and A (r, in), float32, with B·A ≈ the residual."""

    b: np.ndarray
    a: np.ndarray

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def truncate(self, rank: int) -> "LowRank":
        """Leading components of an SVD-ordered factorization: truncating a truncated SVD is exact."""
        return LowRank(self.b[:, :rank].copy(), self.a[:rank].copy())

    def dense(self) -> np.ndarray:
        return self.b @ self.a


@dataclass(frozen=True)
class ThetaInt8:
    """Symmetric INT8 factors, one float32 scale per rank component (NKAT format v1)."""

    a: np.ndarray  # int8 (r, in); A[k, :] = a[k, :] * a_scale[k]
    a_scale: np.ndarray  # float32 (r,)
    b: np.ndarray  # int8 (out, r); B[:, k] = b[:, k] * b_scale[k]
    b_scale: np.ndarray  # float32 (r,)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def truncate(self, rank: int) -> "ThetaInt8":
        """The leading components; scales are per component, so this equals quantizing the truncated fit."""
        return ThetaInt8(self.a[:rank].copy(), self.a_scale[:rank].copy(), self.b[:, :rank].copy(),
                         self.b_scale[:rank].copy())

    def dequantize(self) -> LowRank:
        return LowRank(
            (self.b.astype(np.float32) * self.b_scale[None, :]).astype(np.float32),
            (self.a.astype(np.float32) * self.a_scale[:, None]).astype(np.float32),
        )


@dataclass(frozen=True)
class ThetaFit:
    factors: LowRank
    captured_energy: float  # share of ||E·S||_F^2 the rank-r part holds (S = activation scale)


def activation_scale(mean_square: np.ndarray, floor: float = 1e-6, damping: float = 0.0) -> np.ndarray:
    """S = sqrt(E[x^2] + damping·mean(E[x^2])) per input column, floored so S^-1 stays finite for dead inputs.

    Damping is the diagonal form of GPTQ's: it keeps columns the calibration text barely used from
    being ignored by the fit (S small) while their inputs may be large on other text.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    ms = np.maximum(mean_square.astype(np.float64), 0.0)
    s = np.sqrt(ms + damping * float(ms.mean()))
    return np.maximum(s, floor * max(float(s.max()), 1e-30)).astype(np.float32)


def damped_cholesky(second_moment: np.ndarray, damping: float) -> np.ndarray:
    """Lower-triangular L (float64) with L·Lᵀ = H + damping·mean(diag H)·I, H = E[x xᵀ].

    Raises ValueError when the damped matrix is not positive definite (no damping and a rank-deficient
    H, e.g. fewer calibration tokens than input columns, or a matrix that is not a second moment).
    """
    h = np.asarray(second_moment, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"a second moment must be square, got shape {h.shape}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if not np.isfinite(h).all():
        raise ValueError("the second moment has non-finite entries")
    mean_diag = float(np.diag(h).mean())
    if mean_diag <= 0:
        raise ValueError("the second moment is zero: no input reached this weight")
    damped = 0.5 * (h + h.T) + damping * mean_diag * np.eye(h.shape[0])
    try:
        return np.linalg.cholesky(damped)
    except np.linalg.LinAlgError:
        raise ValueError(f"E[x xᵀ] + {damping:g}·mean(diag)·I is not positive definite; "
                         "use more calibration tokens or a larger damping") from None


def expected_output_error(residual: np.ndarray, correction: np.ndarray, second_moment: np.ndarray) -> float:
    """E‖(E − B·A)x‖² = tr(D·H·Dᵀ), D = E − B·A, H = E[x xᵀ]: the error the layer's output sees."""
    d = residual.astype(np.float64) - correction.astype(np.float64)
    return float(((d @ np.asarray(second_moment, dtype=np.float64)) * d).sum())


def antisymmetrize(factors: LowRank) -> np.ndarray:
    """theta = D - D^T, D = [[0, 2·B·A], [0, 0]] in so(out+in). Dense: for tests and the spec only."""
    out_dim, in_dim = factors.b.shape[0], factors.a.shape[1]
    d = np.zeros((out_dim + in_dim, out_dim + in_dim), dtype=np.float64)
    d[:out_dim, out_dim:] = 2.0 * factors.b.astype(np.float64) @ factors.a.astype(np.float64)
    return d - d.T


def star_product(weight: np.ndarray, theta: np.ndarray, x: np.ndarray, gamma: float) -> np.ndarray:
    """(W ⋆ x) = W·x + ½·γ·(theta ⋆ x), theta ⋆ x being the output block of theta·[0; x]."""
    out_dim = weight.shape[0]
    embedded = np.concatenate([np.zeros((out_dim,) + x.shape[1:], dtype=np.float64), x])
    return weight @ x + 0.5 * gamma * (theta @ embedded)[:out_dim]


def quantize_int8(factors: LowRank) -> ThetaInt8:
    """Symmetric per-component INT8: scale = max|component| / 127, so the error is <= scale / 2."""

    def per_component(m: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        peak = np.abs(m).max(axis=axis)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        shaped = scale[:, None] if axis == 1 else scale[None, :]
        q = np.clip(np.rint(m / shaped), -127, 127).astype(np.int8)
        return q, scale

    a, a_scale = per_component(factors.a, axis=1)
    b, b_scale = per_component(factors.b, axis=0)
    return ThetaInt8(a, a_scale, b, b_scale)
