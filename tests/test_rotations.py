"""SO(8) block math: rotations are rotations, block products equal dense products, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from nkat_gguf.errors import InputError
from nkat_gguf.so8t.rotations import (
    HADAMARD_8,
    apply_blocks_left_transposed,
    apply_blocks_right,
    block_count,
    check_so8,
    hadamard_blocks,
    random_blocks,
    so8_blocks_from_generators,
    validate_skew,
    validate_so8,
)


def dense(blocks: np.ndarray) -> np.ndarray:
    """The block-diagonal n×n matrix, built independently of the einsum path."""
    n = blocks.shape[0] * 8
    out = np.zeros((n, n))
    for k, block in enumerate(blocks):
        out[8 * k : 8 * k + 8, 8 * k : 8 * k + 8] = block
    return out


@pytest.mark.parametrize(
    "blocks",
    [hadamard_blocks(64), hadamard_blocks(64, seed=7), random_blocks(64, seed=3), random_blocks(576, seed=0)],
    ids=["hadamard", "hadamard-signs", "random", "random-576"],
)
def test_blocks_are_rotations(blocks):
    err, det = check_so8(blocks)
    assert blocks.shape[1:] == (8, 8)
    assert err < 1e-12
    assert abs(det - 1.0) < 1e-12
    r = dense(blocks)
    np.testing.assert_allclose(r.T @ r, np.eye(r.shape[0]), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(blocks), 1.0, atol=1e-12)
    validate_so8(blocks, "test")


def test_hadamard_det_is_plus_one_with_any_signs():
    """H8 has det +1; each sign diagonal has an even number of −1 so the product keeps det +1."""
    assert np.linalg.det(HADAMARD_8) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(np.abs(HADAMARD_8), 1 / np.sqrt(8))
    np.testing.assert_array_equal(hadamard_blocks(16), np.stack([HADAMARD_8, HADAMARD_8]))
    for seed in range(20):
        blocks = hadamard_blocks(64, seed=seed)
        signs = np.einsum("kij,ij->kj", blocks, HADAMARD_8)  # column j of H8·diag(s) times column j of H8
        np.testing.assert_allclose(np.abs(signs), 1.0, atol=1e-12)
        assert (np.prod(np.sign(signs), axis=1) == 1).all()
        assert np.linalg.det(blocks).min() > 0.999999
    assert not np.array_equal(hadamard_blocks(64, seed=1), hadamard_blocks(64, seed=2))


def test_generator_exponential_is_the_plane_rotation():
    theta = 0.7
    gen = np.zeros((2, 8, 8))
    gen[1, 2, 5], gen[1, 5, 2] = -theta, theta
    r = so8_blocks_from_generators(gen)
    np.testing.assert_allclose(r[0], np.eye(8), atol=1e-15)
    expected = np.eye(8)
    expected[2, 2] = expected[5, 5] = np.cos(theta)
    expected[2, 5], expected[5, 2] = -np.sin(theta), np.sin(theta)
    np.testing.assert_allclose(r[1], expected, atol=1e-14)


def test_block_products_equal_dense_products():
    rng = np.random.default_rng(0)
    blocks = random_blocks(24, seed=1)
    r = dense(blocks)
    w_in = rng.standard_normal((5, 24))
    w_out = rng.standard_normal((24, 7))
    np.testing.assert_allclose(apply_blocks_right(w_in, blocks), w_in @ r, atol=1e-12)
    np.testing.assert_allclose(apply_blocks_left_transposed(blocks, w_out), r.T @ w_out, atol=1e-12)
    # (W·R)·Rᵀ = W: the transposed blocks undo the rotation
    np.testing.assert_allclose(apply_blocks_right(apply_blocks_right(w_in, blocks), blocks.transpose(0, 2, 1)), w_in,
                               atol=1e-12)


@pytest.mark.parametrize("n", [0, -8, 12, 100])
def test_width_not_a_multiple_of_8_is_refused(n):
    with pytest.raises(InputError, match=f"{n} is not a positive multiple of 8"):
        block_count(n, "d_model")
    with pytest.raises(InputError, match="multiple of 8"):
        hadamard_blocks(n)
    with pytest.raises(InputError, match="multiple of 8"):
        random_blocks(n, seed=0)


def test_mismatched_block_count_is_refused():
    with pytest.raises(ValueError, match="width 16"):
        apply_blocks_right(np.zeros((3, 16)), random_blocks(24, seed=0))
    with pytest.raises(ValueError, match="width 8"):
        apply_blocks_left_transposed(random_blocks(24, seed=0), np.zeros((8, 3)))
    with pytest.raises(InputError, match="expected \\(n/8, 8, 8\\)"):
        so8_blocks_from_generators(np.zeros((2, 4, 4)))


def test_validation_names_the_bad_block():
    blocks = random_blocks(64, seed=4)
    scaled = blocks.copy()
    scaled[3] *= 1.001
    with pytest.raises(InputError, match=r"^w block 3 is not orthogonal: ‖RᵀR − I‖_F = 0.00566"):
        validate_so8(scaled, "w")
    reflected = blocks.copy()
    reflected[5, 0] *= -1
    with pytest.raises(InputError, match=r"^w block 5 is a reflection.*det = -1"):
        validate_so8(reflected, "w")
    assert check_so8(reflected)[1] == pytest.approx(-1.0)
    assert check_so8(2 * np.eye(8)[None])[0] == pytest.approx(3 * np.sqrt(8))
    broken = blocks.copy()
    broken[6, 1, 1] = np.nan
    with pytest.raises(InputError, match="w block 6 holds NaN"):
        validate_so8(broken, "w")


def test_skew_validation_names_the_bad_block():
    g = np.random.default_rng(0).standard_normal((4, 8, 8))
    skew = g - g.transpose(0, 2, 1)
    validate_skew(skew, "a")
    skew[2, 0, 1] += 0.01
    with pytest.raises(InputError, match=r"^a block 2 is not skew-symmetric"):
        validate_skew(skew, "a")
