"""Read trained SO8T rotation gates from a safetensors checkpoint (format: docs/SO8T_CHECKPOINT.md).

The gated model computed W·(R·x) for each gated weight W; baking folds that into W' = W·R. Only
safetensors is read (no pickle, so a checkpoint cannot run code), and every problem is refused
with one line naming the checkpoint tensor and, for bad blocks, the block index.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from nkat_gguf.errors import InputError
from nkat_gguf.math.rotations import BLOCK, block_count, so8_blocks_from_generators, validate_skew, validate_so8

GENERATOR = "so8t_generator"
ROTATION = "so8t_rotation"
ALPHA = "so8t_alpha"
NOT_GATEABLE = {"token_embd.weight"}  # a lookup table: there is no input vector to rotate


def load_so8t_checkpoint(path: str | Path, model_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Gated GGUF weight name -> rotation blocks (n/8, 8, 8) float64, validated against the model.

    `model_shapes` maps every tensor name of the model to its numpy-order shape (out, in).
    """
    path = Path(path)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in _read_tensors(path).items():
        name, _, kind = key.rpartition(".")
        if kind not in (GENERATOR, ROTATION, ALPHA) or not name:
            raise InputError(
                f"{path.name}: tensor {key} is not <weight name>.{GENERATOR}, .{ROTATION} or .{ALPHA}"
            )
        parts.setdefault(name, {})[kind] = value
    if not parts:
        raise InputError(f"{path.name}: checkpoint holds no SO8T gates")
    return {name: _gate_rotation(path.name, name, found, model_shapes) for name, found in parts.items()}


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors as float64 numpy; read through torch so bfloat16 checkpoints load too."""
    if not path.is_file():
        raise InputError(f"no such SO8T checkpoint: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key).to(torch.float64).numpy() for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path.name}: not a readable safetensors file ({exc})") from None


def _gate_rotation(
    file: str, name: str, found: dict[str, np.ndarray], model_shapes: Mapping[str, tuple[int, ...]]
) -> np.ndarray:
    if name not in model_shapes:
        raise InputError(f"{file}: gate for {name}, a tensor the model lacks")
    shape = model_shapes[name]
    if len(shape) != 2:
        raise InputError(f"{file}: {name} has shape {shape}: only weight matrices (out, in) can be gated")
    if name in NOT_GATEABLE:
        raise InputError(f"{file}: {name} cannot be gated: it is a lookup table, with no input vector to rotate")
    if (GENERATOR in found) == (ROTATION in found):
        raise InputError(f"{file}: {name} needs exactly one of .{GENERATOR} and .{ROTATION}")
    kind = GENERATOR if GENERATOR in found else ROTATION
    key = f"{name}.{kind}"
    blocks = found[kind]
    expected = (block_count(shape[1], f"{name} input width"), BLOCK, BLOCK)
    if blocks.shape != expected:
        raise InputError(f"{file}: {key} has shape {blocks.shape}, expected {expected} for input width {shape[1]}")
    if kind == ROTATION:
        if ALPHA in found:
            raise InputError(f"{file}: {name}.{ALPHA} scales a generator; {name} has a rotation instead")
        validate_so8(blocks, f"{file}: {key}")
        return blocks
    validate_skew(blocks, f"{file}: {key}")
    if ALPHA in found:
        blocks = blocks * _gate_scale(file, f"{name}.{ALPHA}", found[ALPHA])
    rotation = so8_blocks_from_generators(blocks)
    validate_so8(rotation, f"{file}: exp({key})")
    return rotation


def _gate_scale(file: str, key: str, alpha: np.ndarray) -> float:
    """σ(α): the gate's share of the full generator, R = exp(σ(α)·A)."""
    if alpha.size != 1 or alpha.ndim > 1:
        raise InputError(f"{file}: {key} has shape {alpha.shape}, expected a scalar")
    a = float(alpha.reshape(()))
    if not np.isfinite(a):
        raise InputError(f"{file}: {key} is {a}, expected a finite number")
    return 0.5 * (1.0 + np.tanh(0.5 * a))  # the logistic function, without overflow for large |α|
