"""SO(8) block rotations: build them, check them, apply them without forming the dense matrix.

A rotation of width n is R = diag(R_1 … R_{n/8}), each R_k in SO(8), stored as blocks (n/8, 8, 8)
in float64. Shapes are numpy order: a weight W is (out, in) and y = W x, so rotating a weight's
input is W·R and rotating its output is Rᵀ·W. Applying blocks costs 8 multiply-adds per element,
where the dense n×n product would cost n; for a 49152×576 embedding that is 0.2 G instead of 16 G.
"""

from __future__ import annotations

import numpy as np
import torch

from nkat_gguf.errors import InputError

BLOCK = 8
ORTHOGONALITY_TOLERANCE = 1e-4  # ‖RᵀR − I‖_F per block, the acceptance bound
SKEW_TOLERANCE = 1e-4  # ‖A + Aᵀ‖_F per block

# Sylvester's H8 = H2⊗H2⊗H2 / √8. det(H2/√2) = −1, and each Kronecker step raises the factors to an
# even power, so det(H8) = +1 already: the det fix is needed only for the random sign diagonals.
_H2 = np.array([[1.0, 1.0], [1.0, -1.0]])
HADAMARD_8 = np.kron(np.kron(_H2, _H2), _H2) / np.sqrt(BLOCK)


def block_count(n: int, what: str = "dimension") -> int:
    """n/8, or a one-line error: SO(8) blocks tile a width only if 8 divides it."""
    if n <= 0 or n % BLOCK:
        raise InputError(f"{what} {n} is not a positive multiple of {BLOCK}; SO(8) rotations need one")
    return n // BLOCK


def so8_blocks_from_generators(generators: np.ndarray) -> np.ndarray:
    """R_k = exp(A_k) in float64; A_k skew-symmetric makes R_k exactly a rotation (up to rounding)."""
    gen = np.asarray(generators, dtype=np.float64)
    if gen.ndim != 3 or gen.shape[1:] != (BLOCK, BLOCK):
        raise InputError(f"generators have shape {gen.shape}, expected (n/8, 8, 8)")
    return torch.linalg.matrix_exp(torch.from_numpy(gen)).numpy()


def hadamard_blocks(n: int, seed: int | None = None) -> np.ndarray:
    """H8 in every block; with a seed, each block times its own random ±1 diagonal of det +1."""
    m = block_count(n)
    blocks = np.broadcast_to(HADAMARD_8, (m, BLOCK, BLOCK)).copy()
    if seed is None:
        return blocks
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(m, BLOCK))
    signs[:, 0] *= np.prod(signs, axis=1)  # an odd number of −1 would make det −1: flip one more
    return blocks * signs[:, None, :]


def random_blocks(n: int, seed: int) -> np.ndarray:
    """exp of random skew generators with N(0, 1) off-diagonal entries (angles spread over the circle)."""
    m = block_count(n)
    g = np.random.default_rng(seed).standard_normal((m, BLOCK, BLOCK))
    return so8_blocks_from_generators((g - g.transpose(0, 2, 1)) / np.sqrt(2.0))


def _check_width(width: int, blocks: np.ndarray, side: str) -> None:
    if blocks.ndim != 3 or blocks.shape[1:] != (BLOCK, BLOCK) or blocks.shape[0] * BLOCK != width:
        raise ValueError(f"{side} width {width} does not match rotation blocks of shape {blocks.shape}")


def apply_blocks_right(w: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """W·R over the last axis of W (rotates a weight's input columns)."""
    _check_width(w.shape[-1], blocks, "column")
    m = blocks.shape[0]
    rotated = np.einsum("rmi,mij->rmj", w.reshape(-1, m, BLOCK), blocks, optimize=True)
    return rotated.reshape(w.shape)


def apply_blocks_left_transposed(blocks: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Rᵀ·W over the first axis of W (rotates a weight's output rows)."""
    _check_width(w.shape[0], blocks, "row")
    m = blocks.shape[0]
    rotated = np.einsum("mij,mic->mjc", blocks, w.reshape(m, BLOCK, -1), optimize=True)
    return rotated.reshape(w.shape)


def orthogonality_errors(blocks: np.ndarray) -> np.ndarray:
    """‖R_kᵀR_k − I‖_F for every block k."""
    b = np.asarray(blocks, dtype=np.float64)
    return np.linalg.norm(b.transpose(0, 2, 1) @ b - np.eye(BLOCK), axis=(1, 2))


def check_so8(blocks: np.ndarray) -> tuple[float, float]:
    """(largest ‖RᵀR − I‖_F, smallest det) over all blocks: the figures QC reports."""
    b = np.asarray(blocks, dtype=np.float64)
    return float(orthogonality_errors(b).max()), float(np.linalg.det(b).min())


def validate_so8(blocks: np.ndarray, name: str) -> None:
    """Raise InputError naming the first block that is not finite, not orthogonal or not det +1."""
    b = np.asarray(blocks, dtype=np.float64)
    if b.ndim != 3 or b.shape[1:] != (BLOCK, BLOCK):
        raise InputError(f"{name}: rotation blocks have shape {b.shape}, expected (n/8, 8, 8)")
    finite = np.isfinite(b).all(axis=(1, 2))
    if not finite.all():
        raise InputError(f"{name} block {int(np.argmin(finite))} holds NaN or infinity")
    errors = orthogonality_errors(b)
    dets = np.linalg.det(b)
    for k, (err, det) in enumerate(zip(errors, dets)):
        if err > ORTHOGONALITY_TOLERANCE:
            raise InputError(
                f"{name} block {k} is not orthogonal: ‖RᵀR − I‖_F = {err:.3g} > {ORTHOGONALITY_TOLERANCE:g}"
            )
        if det <= 0:
            raise InputError(f"{name} block {k} is a reflection, not a rotation: det = {det:.6g} (expected +1)")


def validate_skew(generators: np.ndarray, name: str) -> None:
    """Raise InputError naming the first generator block that is not finite or not skew-symmetric."""
    g = np.asarray(generators, dtype=np.float64)
    finite = np.isfinite(g).all(axis=(1, 2))
    if not finite.all():
        raise InputError(f"{name} block {int(np.argmin(finite))} holds NaN or infinity")
    asym = np.linalg.norm(g + g.transpose(0, 2, 1), axis=(1, 2))
    bad = np.flatnonzero(asym > SKEW_TOLERANCE)
    if bad.size:
        k = int(bad[0])
        raise InputError(
            f"{name} block {k} is not skew-symmetric: ‖A + Aᵀ‖_F = {asym[k]:.3g} > {SKEW_TOLERANCE:g}"
        )
