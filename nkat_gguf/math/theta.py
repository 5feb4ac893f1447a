"""The theta math: residual -> truncated SVD -> antisymmetric generator -> INT8 factors.

Pure functions on numpy/torch arrays, shapes in numpy order: a weight W is (out, in) and y = W x.

theta is an element of so(out+in): theta = D - D^T with D = [[0, 2·B·A], [0, 0]]. Acting on the
input embedded as [0; x], its output block is 2·B·A·x, so the star product
    (W ⋆ x) = W·x + ½·γ·(theta ⋆ x) = W·x + γ·B·A·x
applies the rank-r correction B·A in full at γ = 1. theta is determined by (A, B), which are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SVD_OVERSAMPLE = 16  # with 4 power iterations: within ~0.5 % of the exact SVD on real residuals
SVD_POWER_ITERATIONS = 4


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


def activation_scale(mean_square: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """S = sqrt(E[x^2]) per input column, floored so S^-1 stays finite for dead inputs."""
    s = np.sqrt(np.maximum(mean_square.astype(np.float64), 0.0))
    return np.maximum(s, floor * max(float(s.max()), 1e-30)).astype(np.float32)


def theta_from_residual(
    residual: np.ndarray, rank: int, input_scale: np.ndarray | None = None, seed: int = 0
) -> ThetaFit:
    """Best rank-r fit of the residual E in the activation-weighted norm ||(E - BA)·S||_F.

    A plain SVD minimises the error of the weights; weighting columns by S = sqrt(E[x^2]) minimises
    the expected error of the outputs W·x instead, which is what perplexity sees.
    """
    if rank < 1:
        raise ValueError("rank must be >= 1")
    if rank > min(residual.shape):
        raise ValueError(f"rank {rank} exceeds the smaller dimension of a {residual.shape} weight")
    # imported here, not at the top: every command reads theta (ThetaInt8), only fitting needs torch,
    # and its import costs 1.5 s of CPU before a bad input can even be refused
    import torch

    e = torch.from_numpy(np.ascontiguousarray(residual, dtype=np.float32))
    s = torch.ones(e.shape[1]) if input_scale is None else torch.from_numpy(input_scale.astype(np.float32))
    m = e * s[None, :]
    total = float((m.double() ** 2).sum())
    q = min(rank + SVD_OVERSAMPLE, *m.shape)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        u, sigma, v = torch.svd_lowrank(m, q=q, niter=SVD_POWER_ITERATIONS)
    u, sigma, v = u[:, :rank], sigma[:rank], v[:, :rank]
    b = (u * sigma[None, :]).numpy().astype(np.float32)
    a = (v.T / s[None, :]).numpy().astype(np.float32)
    captured = float((sigma.double() ** 2).sum()) / total if total > 0 else 1.0
    return ThetaFit(LowRank(b, a), min(captured, 1.0))


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
