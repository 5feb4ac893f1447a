"""The truncated-SVD fits of theta: the rank-r correction B·A of a quantization residual E.

Separate from theta.py because these need torch (randomized SVD) and everything that only reads or
applies theta does not: a command that refuses a bad file never pays torch's import. Shapes are numpy
order, a weight W is (out, in) and y = W x.
"""

from __future__ import annotations

import numpy as np
import torch

from nkat_gguf.math.theta import LowRank, ThetaFit

SVD_OVERSAMPLE = 16  # with 4 power iterations: within ~0.5 % of the exact SVD on real residuals
SVD_POWER_ITERATIONS = 4


def _check_rank(residual: np.ndarray, rank: int) -> None:
    if rank < 1:
        raise ValueError("rank must be >= 1")
    if rank > min(residual.shape):
        raise ValueError(f"rank {rank} exceeds the smaller dimension of a {residual.shape} weight")


def _svd(m: np.ndarray, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading `rank` singular triplets (U, σ, V) of m, randomized and seeded (reproducible)."""
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
    q = min(rank + SVD_OVERSAMPLE, *t.shape)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        u, sigma, v = torch.svd_lowrank(t, q=q, niter=SVD_POWER_ITERATIONS)
    return u[:, :rank], sigma[:rank], v[:, :rank]


def theta_from_residual(
    residual: np.ndarray, rank: int, input_scale: np.ndarray | None = None, seed: int = 0
) -> ThetaFit:
    """Best rank-r fit of the residual E in the activation-weighted norm ||(E - BA)·S||_F.

    A plain SVD minimises the error of the weights; weighting columns by S = sqrt(E[x^2]) minimises
    the expected error of the outputs W·x instead, which is what perplexity sees.
    """
    _check_rank(residual, rank)
    e = torch.from_numpy(np.ascontiguousarray(residual, dtype=np.float32))
    s = torch.ones(e.shape[1]) if input_scale is None else torch.from_numpy(input_scale.astype(np.float32))
    m = e * s[None, :]
    total = float((m.double() ** 2).sum())
    u, sigma, v = _svd(m.numpy(), rank, seed)
    b = (u * sigma[None, :]).numpy().astype(np.float32)
    a = (v.T / s[None, :]).numpy().astype(np.float32)
    captured = float((sigma.double() ** 2).sum()) / total if total > 0 else 1.0
    return ThetaFit(LowRank(b, a), min(captured, 1.0))


def theta_whitened(residual: np.ndarray, rank: int, cholesky: np.ndarray, seed: int = 0) -> ThetaFit:
    """The rank-r minimiser of E‖(E − B·A)x‖² for the (damped) H = L·Lᵀ: B·A·L is the truncated SVD of E·L.

    ‖(E − B·A)·L‖_F² = tr((E − B·A)·H·(E − B·A)ᵀ), so with E·L ≈ U_r Σ_r V_rᵀ: B = U_r Σ_r, A = V_rᵀ L⁻¹.
    This is the exact optimum (diagonal scaling is it only when inputs are uncorrelated); damping
    trades it for robustness on text unlike the calibration text.
    """
    _check_rank(residual, rank)
    l = np.asarray(cholesky, dtype=np.float64)
    if l.shape != (residual.shape[1],) * 2:
        raise ValueError(f"Cholesky factor {l.shape} does not match a {residual.shape} weight")
    m = residual.astype(np.float64) @ l
    u, sigma, v = _svd(m.astype(np.float32), rank, seed)
    b = (u * sigma[None, :]).numpy().astype(np.float32)
    lt = torch.from_numpy(np.ascontiguousarray(l.T))
    a = torch.linalg.solve_triangular(lt, v.double(), upper=True).T.numpy()  # Aᵀ = L⁻ᵀ V_r
    total = float((m ** 2).sum())
    captured = float((sigma.double() ** 2).sum()) / total if total > 0 else 1.0
    return ThetaFit(LowRank(b, a.astype(np.float32)), min(captured, 1.0))


def residual_spectrum(residual: np.ndarray, input_scale: np.ndarray | None = None) -> np.ndarray:
    """σ_k² of the matrix theta_from_residual fits (E·S), descending: what each rank component captures.

    The allocation spends bytes where these are largest; rank r of theta_from_residual captures the first r.
    """
    e = torch.from_numpy(np.ascontiguousarray(residual, dtype=np.float32))
    if input_scale is not None:
        e = e * torch.from_numpy(input_scale.astype(np.float32))[None, :]
    return (torch.linalg.svdvals(e.double()) ** 2).numpy()
