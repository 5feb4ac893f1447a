"""Read trained SO8T rotation gates from a safetensors checkpoint (format: docs/SO8T_CHECKPOINT.md).

The gated model computed W·(R·x) for each gated weight W; baking folds that into W' = W·R. A checkpoint
may instead hold function-preserving rotations (`residual`: R1 of the residual stream, and
`blk.N.attn_heads`: R2 of layer N), which are baked as `--so8t random` bakes its rotations. Only
safetensors is read (no pickle, so a checkpoint cannot run code), and every problem is refused
with one line naming the checkpoint tensor and, for bad blocks, the block index.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from nkat_gguf.errors import InputError
from nkat_gguf.so8t.rotations import BLOCK, block_count, so8_blocks_from_generators, validate_skew, validate_so8

GENERATOR = "so8t_generator"
ROTATION = "so8t_rotation"
ALPHA = "so8t_alpha"
NOT_GATEABLE = {"token_embd.weight"}  # a lookup table: there is no input vector to rotate
RESIDUAL = "residual"  # R1 of the residual stream (function-preserving, norms folded)
HEADS = "blk.{}.attn_heads"  # R2 of one layer, on each value head (function-preserving)
_HEADS = re.compile(r"blk\.(\d+)\.attn_heads")


def is_rotation_name(name: str) -> bool:
    """True for the function-preserving rotations' names (not weights of the model)."""
    return name == RESIDUAL or _HEADS.fullmatch(name) is not None


def load_so8t_checkpoint(path: str | Path, model_shapes: Mapping[str, tuple[int, ...]],
                         rotation_widths: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Gated GGUF weight name (or `residual`, `blk.N.attn_heads`) -> rotation blocks (n/8, 8, 8) float64.

    `model_shapes` maps every tensor name of the model to its numpy-order shape (out, in);
    `rotation_widths` the width of each function-preserving rotation the model can take (d_model for
    `residual`, the value head size for each layer's `attn_heads`). A checkpoint holds either weight
    gates or function-preserving rotations, not both: they are baked in different ways.
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
    rotations = sorted(name for name in parts if is_rotation_name(name))
    if rotations and len(rotations) < len(parts):
        gate = next(name for name in parts if not is_rotation_name(name))
        raise InputError(f"{path.name}: holds both the function-preserving rotation {rotations[0]} and the weight "
                         f"gate {gate}; a checkpoint holds one kind")
    if rotations and RESIDUAL not in parts:
        raise InputError(f"{path.name}: head rotations ({rotations[0]}) need a {RESIDUAL} rotation beside them")
    widths = dict(rotation_widths or {})
    return {name: _gate_rotation(path.name, name, found, model_shapes, widths) for name, found in parts.items()}


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
    file: str, name: str, found: dict[str, np.ndarray], model_shapes: Mapping[str, tuple[int, ...]],
    rotation_widths: Mapping[str, int],
) -> np.ndarray:
    if is_rotation_name(name):
        if name not in rotation_widths:
            raise InputError(f"{file}: rotation {name} does not fit this model (it has no such layer, or "
                             "the model is not one whose residual stream can be rotated)")
        width = rotation_widths[name]
    else:
        width = _gate_width(file, name, model_shapes)
    if (GENERATOR in found) == (ROTATION in found):
        raise InputError(f"{file}: {name} needs exactly one of .{GENERATOR} and .{ROTATION}")
    kind = GENERATOR if GENERATOR in found else ROTATION
    key = f"{name}.{kind}"
    blocks = found[kind]
    expected = (block_count(width, f"{name} input width"), BLOCK, BLOCK)
    if blocks.shape != expected:
        raise InputError(f"{file}: {key} has shape {blocks.shape}, expected {expected} for input width {width}")
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


def _gate_width(file: str, name: str, model_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The input width n of a gated weight, after the checks that it can be gated at all."""
    if name not in model_shapes:
        raise InputError(f"{file}: gate for {name}, a tensor the model lacks")
    shape = model_shapes[name]
    if len(shape) != 2:
        raise InputError(f"{file}: {name} has shape {shape}: only weight matrices (out, in) can be gated")
    if name in NOT_GATEABLE:
        raise InputError(f"{file}: {name} cannot be gated: it is a lookup table, with no input vector to rotate")
    return shape[1]


def _gate_scale(file: str, key: str, alpha: np.ndarray) -> float:
    """σ(α): the gate's share of the full generator, R = exp(σ(α)·A)."""
    if alpha.size != 1 or alpha.ndim > 1:
        raise InputError(f"{file}: {key} has shape {alpha.shape}, expected a scalar")
    a = float(alpha.reshape(()))
    if not np.isfinite(a):
        raise InputError(f"{file}: {key} is {a}, expected a finite number")
    return 0.5 * (1.0 + np.tanh(0.5 * a))  # the logistic function, without overflow for large |α|
