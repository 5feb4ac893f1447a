"""Whitening against diagonal scaling: the fit that minimises the expected output error E‖(E − BA)x‖²."""

from __future__ import annotations

import numpy as np
import pytest

from nkat_gguf.math.lowrank import theta_from_residual, theta_whitened
from nkat_gguf.math.theta import activation_scale, damped_cholesky, expected_output_error

RNG = np.random.default_rng(11)


def correlated_inputs(n: int, dim: int) -> np.ndarray:
    """Inputs with correlated columns of very different scales, as hidden states after RMSNorm are."""
    mixing = RNG.standard_normal((dim, dim)) * np.exp(RNG.normal(0, 1.0, dim))[None, :]
    return RNG.standard_normal((n, dim)) @ mixing


def test_whitening_beats_diagonal_scaling_on_the_true_output_error() -> None:
    x = correlated_inputs(4000, 48)  # (N, in)
    h = x.T @ x / len(x)  # the true E[x xᵀ]
    e = RNG.standard_normal((64, 48))  # a white residual, like quantization noise
    whitened = theta_whitened(e, 6, damped_cholesky(h, 0.0)).factors.dense()
    diagonal = theta_from_residual(e, 6, activation_scale(np.diag(h))).factors.dense()
    err_w, err_d = expected_output_error(e, whitened, h), expected_output_error(e, diagonal, h)
    assert err_w < 0.9 * err_d
    # and it is the optimum: the tail of the singular values of E·L, nothing less
    sigma = np.linalg.svd(e @ np.linalg.cholesky(h), compute_uv=False)
    assert err_w == pytest.approx((sigma[6:] ** 2).sum(), rel=2e-3)


def test_expected_output_error_matches_a_sample_mean() -> None:
    x = correlated_inputs(2000, 16)
    h = x.T @ x / len(x)
    e, c = RNG.standard_normal((8, 16)), RNG.standard_normal((8, 16))
    sample = float(np.mean(np.sum(((e - c) @ x.T) ** 2, axis=0)))
    assert expected_output_error(e, c, h) == pytest.approx(sample, rel=1e-9)


def test_damping_makes_a_rank_deficient_second_moment_usable() -> None:
    x = correlated_inputs(10, 32)  # 10 tokens, 32 columns: H has rank 10
    h = x.T @ x / len(x)
    with pytest.raises(ValueError, match="not positive definite"):
        damped_cholesky(h, 0.0)
    l = damped_cholesky(h, 0.01)
    assert np.allclose(l @ l.T, h + 0.01 * np.diag(h).mean() * np.eye(32))
    fit = theta_whitened(RNG.standard_normal((20, 32)), 4, l)
    assert np.isfinite(fit.factors.a).all() and np.isfinite(fit.factors.b).all()


@pytest.mark.parametrize("bad", [np.zeros((4, 4)), np.ones((3, 4)), np.full((2, 2), np.nan)])
def test_cholesky_refuses_what_is_no_second_moment(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        damped_cholesky(bad, 0.01)


def test_diagonal_damping_lifts_barely_used_columns() -> None:
    ms = np.array([1.0, 1e-8, 4.0, 0.0])
    plain, damped = activation_scale(ms), activation_scale(ms, damping=0.1)
    assert plain[1] < 1e-3 < damped[1]  # the floor alone keeps it near zero
    assert damped == pytest.approx(np.sqrt(ms + 0.1 * ms.mean()), rel=1e-6)
