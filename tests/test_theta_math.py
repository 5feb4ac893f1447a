"""Pure-math tests of theta: SVD fit, antisymmetric generator, star product, INT8 factors."""

from __future__ import annotations

import numpy as np
import pytest

from nkat_gguf.math.lowrank import theta_from_residual
from nkat_gguf.math.theta import LowRank, activation_scale, antisymmetrize, quantize_int8, star_product

RNG = np.random.default_rng(7)


def low_rank_plus_noise(out_dim: int, in_dim: int, rank: int, noise: float = 1e-3) -> np.ndarray:
    return (RNG.standard_normal((out_dim, rank)) @ RNG.standard_normal((rank, in_dim))
            + noise * RNG.standard_normal((out_dim, in_dim))).astype(np.float32)


def test_svd_recovers_a_low_rank_residual() -> None:
    e = low_rank_plus_noise(96, 64, rank=4)
    fit = theta_from_residual(e, rank=4)
    assert fit.factors.b.shape == (96, 4) and fit.factors.a.shape == (4, 64)
    assert np.linalg.norm(e - fit.factors.dense()) / np.linalg.norm(e) < 1e-2
    assert fit.captured_energy > 0.999


def test_captured_energy_matches_singular_values() -> None:
    e = RNG.standard_normal((80, 48)).astype(np.float32)
    sigma = np.linalg.svd(e.astype(np.float64), compute_uv=False)
    fit = theta_from_residual(e, rank=6)
    expected = (sigma[:6] ** 2).sum() / (sigma ** 2).sum()
    assert fit.captured_energy == pytest.approx(expected, rel=0.05)


def test_activation_weighting_minimises_the_weighted_error() -> None:
    """Weighted SVD wins on ||(E - BA)S||, plain SVD wins on ||E - BA||: each optimises its own norm."""
    e = RNG.standard_normal((64, 64)).astype(np.float32)
    s = activation_scale(np.exp(RNG.normal(0, 1.5, 64)).astype(np.float32))
    weighted = theta_from_residual(e, 8, s).factors.dense()
    plain = theta_from_residual(e, 8).factors.dense()
    err = lambda m, scale: np.linalg.norm((e - m) * scale[None, :])  # noqa: E731
    assert err(weighted, s) < 0.95 * err(plain, s)
    assert err(plain, np.ones(64)) < err(weighted, np.ones(64))


def test_activation_scale_keeps_dead_inputs_finite() -> None:
    s = activation_scale(np.array([4.0, 0.0, 1.0], dtype=np.float32))
    assert s[0] == pytest.approx(2.0) and s[2] == pytest.approx(1.0)
    assert 0 < s[1] < 1e-3 and np.isfinite(1 / s).all()


def test_truncated_fits_are_near_the_exact_optimum_even_on_white_noise() -> None:
    """Quantization residuals are close to white noise, the hardest case for a randomized SVD."""
    e = RNG.standard_normal((300, 200)).astype(np.float32)
    sigma = np.linalg.svd(e.astype(np.float64), compute_uv=False)
    total = (sigma ** 2).sum()
    for fit in (theta_from_residual(e, 4).factors, theta_from_residual(e, 12).factors.truncate(4)):
        captured = 1 - np.linalg.norm(e - fit.dense()) ** 2 / total
        assert captured >= 0.97 * (sigma[:4] ** 2).sum() / total


def test_theta_is_antisymmetric_and_star_product_applies_gamma_ba() -> None:
    factors = LowRank(RNG.standard_normal((6, 3)).astype(np.float32), RNG.standard_normal((3, 5)).astype(np.float32))
    theta = antisymmetrize(factors)
    assert theta.shape == (11, 11)
    np.testing.assert_allclose(theta, -theta.T)
    w = RNG.standard_normal((6, 5))
    x = RNG.standard_normal(5)
    for gamma in (0.0, 0.5, 0.97, 1.0):
        np.testing.assert_allclose(star_product(w, theta, x, gamma), w @ x + gamma * factors.dense() @ x, atol=1e-5)


def test_int8_error_is_at_most_half_a_step_per_component() -> None:
    factors = LowRank(RNG.standard_normal((40, 4)).astype(np.float32) * [1, 10, 0.1, 0],
                      RNG.standard_normal((4, 30)).astype(np.float32))
    q = quantize_int8(factors)
    assert q.a.dtype == np.int8 and q.b.dtype == np.int8
    back = q.dequantize()
    assert np.all(np.abs(back.a - factors.a) <= q.a_scale[:, None] / 2 + 1e-7)
    assert np.all(np.abs(back.b - factors.b) <= q.b_scale[None, :] / 2 + 1e-7)
    assert np.all(back.b[:, 3] == 0)  # an all-zero component stays zero
    assert np.abs(q.a).max() == 127


@pytest.mark.parametrize("rank", [0, -1, 33])
def test_rank_out_of_range_is_refused(rank: int) -> None:
    with pytest.raises(ValueError):
        theta_from_residual(np.ones((32, 48), dtype=np.float32), rank)
