"""Bake SO(8) rotations into a llama GGUF's weights so stock llama.cpp runs the result unchanged.

Column convention y = W x, weights in numpy order (out, in).

Residual rotation Q (modes `hadamard`, `random`): the residual stream becomes x' = Qᵀx.
  token_embd  E' = E·Q                      (rows are the residual vectors)
  inputs      W' = W·diag(g)·Q              (attn_q/k/v with g = attn_norm, ffn_gate/up with g = ffn_norm,
                                              output with g = output_norm; the norm is then written as ones)
  outputs     W' = Qᵀ·W                     (attn_output, ffn_down)
RMSNorm divides by rms(x) = rms(Qᵀx), so it commutes with Q once its elementwise weight g is folded
into the next matrix; llama.cpp still multiplies by the norm tensors, hence ones rather than removal.
A tied model gets its own output.weight = E·diag(g)·Q, since the head is no longer the embedding.

Head rotation R2 (size head_dim, one per layer, optional): each value head's output is rotated,
v' = R2ᵀv, and undone where attn_output reads it:
  attn_v      W_v' = diag(R2ᵀ … R2ᵀ)·W_v     (one R2ᵀ per KV head's rows)
  attn_output W_o' = W_o·diag(R2 … R2)       (one R2 per query head's columns)
Attention mixes value vectors linearly over positions, so every query head sharing a KV head (GQA)
sees R2ᵀ·o and its W_o columns map it back: W_o·R2·R2ᵀ·o = W_o·o.

Trained gates (mode `file:PATH`): the gated model computed W·(R·x), so W' = W·R. A checkpoint of
trained function-preserving rotations (`residual`, `blk.N.attn_heads`) is baked like `random`.

Each tensor is computed on demand from the memory-mapped source, in float64, and written as F32;
tensors a plan does not touch keep their type and bytes. Memory stays at one tensor however deep.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType, Keys

from nkat_gguf.errors import InputError, UnsupportedModelError
from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import TensorSpec, Value, copy_metadata
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.so8t.checkpoint import HEADS, RESIDUAL, load_so8t_checkpoint
from nkat_gguf.so8t.rotations import (
    apply_blocks_left_transposed,
    apply_blocks_right,
    block_count,
    check_so8,
    hadamard_blocks,
    random_blocks,
)

RESIDUAL_MODES = ("hadamard", "random")
FILE_PREFIX = "file:"
F32 = GGMLQuantizationType.F32
ALL_F32 = Value(GGUFValueType.UINT32, 0)  # general.file_type of a model whose weights are all F32

_INPUT_NORM = {"attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm",
               "ffn_gate": "ffn_norm", "ffn_up": "ffn_norm"}
_OUTPUT_SIDE = {"attn_output", "ffn_down"}
_NORMS = {"attn_norm", "ffn_norm", "output_norm"}
_UNTOUCHED = {"rope_freqs"}  # RoPE frequency factors act inside a head, not on the residual stream
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclass(frozen=True)
class BakePlan:
    """Concrete rotations to bake; `make_plan` builds one from a --so8t mode string."""

    mode: str  # "hadamard", "random" or "file"
    residual: np.ndarray | None = None  # Q blocks (d_model/8, 8, 8)
    heads: tuple[np.ndarray, ...] = ()  # R2 blocks (head_dim/8, 8, 8) per layer; () = no head rotation
    gates: Mapping[str, np.ndarray] = field(default_factory=dict)  # weight name -> R blocks, W' = W·R
    seed: int | None = None
    checkpoint: str | None = None

    def blocks(self) -> np.ndarray:
        """Every block of the plan, for the orthogonality and det figures."""
        return np.concatenate([b for b in (self.residual, *self.heads, *self.gates.values()) if b is not None])


@dataclass(frozen=True)
class BakedModel:
    """What `write_gguf(dst, baked.metadata, baked.specs, baked.produce)` needs."""

    metadata: dict[str, Any]
    specs: list[TensorSpec]
    recipes: Mapping[str, Callable[[], np.ndarray]]

    def produce(self, spec: TensorSpec) -> np.ndarray:
        return self.recipes[spec.name]()


@dataclass(frozen=True)
class _Llama:
    """The shape facts a residual/head rotation needs, read from the GGUF."""

    d_model: int
    n_layers: int
    n_head: int
    n_head_kv: int
    head_dim_v: int
    tied: bool


def make_plan(mode: str, source: TensorSource, seed: int | None = None, heads: bool = False) -> BakePlan:
    """Parse `hadamard`, `random` or `file:PATH.safetensors` into rotations for this model.

    Seeds: `random` without one uses 0; `hadamard` without one is the plain H8 in every block.
    The residual rotation and each layer's R2 draw from independent streams of the seed.
    """
    if seed is not None and seed < 0:
        raise InputError(f"SO8T seed must be >= 0, got {seed}")
    if mode.startswith(FILE_PREFIX):
        if heads:
            raise InputError("head rotations (R2) go with hadamard/random, not with trained gates")
        return _file_plan(Path(mode[len(FILE_PREFIX):]), source)
    if mode not in RESIDUAL_MODES:
        raise InputError(f"unknown SO8T mode {mode!r}: expected hadamard, random or file:PATH.safetensors")
    if mode == "random" and seed is None:
        seed = 0
    model = _read_llama(source)
    make = hadamard_blocks if mode == "hadamard" else random_blocks
    residual = make(model.d_model, _stream_seed(seed, 0))
    r2: tuple[np.ndarray, ...] = ()
    if heads:
        block_count(model.head_dim_v, "value head_dim")
        r2 = tuple(make(model.head_dim_v, _stream_seed(seed, 1 + i)) for i in range(model.n_layers))
    return BakePlan(mode, residual=residual, heads=r2, seed=seed)


def _file_plan(path: Path, source: TensorSource) -> BakePlan:
    """Weight gates, or a trained residual rotation with its head rotations (identity where a layer has none)."""
    shapes = {name: source.numpy_shape(name) for name in source.infos}
    widths: dict[str, int] = {}
    if source.layout.architecture == "llama":
        model = _read_llama(source)
        widths = {RESIDUAL: model.d_model} | {HEADS.format(i): model.head_dim_v for i in range(model.n_layers)}
    found = load_so8t_checkpoint(path, shapes, widths)
    if RESIDUAL not in found:
        return BakePlan("file", gates=found, checkpoint=path.name)
    heads: tuple[np.ndarray, ...] = ()
    if len(found) > 1:
        identity = np.tile(np.eye(8), (model.head_dim_v // 8, 1, 1))
        heads = tuple(found.get(HEADS.format(i), identity) for i in range(model.n_layers))
    return BakePlan("file", residual=found[RESIDUAL], heads=heads, checkpoint=path.name)


def _stream_seed(seed: int | None, stream: int) -> int | None:
    return None if seed is None else int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def bake_rotations(source: TensorSource, plan: BakePlan) -> BakedModel:
    """Specs and lazy recipes for the baked model; nothing heavy is computed until `produce`.

    Blocks are not refused here: their worst orthogonality error and det go into the metadata, and
    QC decides (so a deliberately broken plan can be shown to fail QC).
    """
    if plan.residual is None:
        recipes = _gate_recipes(source, plan.gates)
        specs = [_spec(source, t.name, t.name in plan.gates) for t in source.layout.tensors]
    else:
        recipes, specs = _residual_recipes(source, plan)
    max_err, min_det = check_so8(plan.blocks())
    metadata: dict[str, Any] = copy_metadata(source.layout, drop_prefixes=("GGUF.", nkat.PREFIX, Keys.General.ALIGNMENT))
    if plan.residual is not None:
        metadata[Keys.General.FILE_TYPE] = ALL_F32
    metadata[nkat.SO8T_MODE] = plan.mode
    if plan.seed is not None:
        metadata[nkat.SO8T_SEED] = plan.seed
    if plan.checkpoint is not None:
        metadata[nkat.SO8T_CHECKPOINT] = plan.checkpoint
    metadata[nkat.SO8T_HEADS] = bool(plan.heads)
    metadata[nkat.SO8T_MAX_ORTHOGONALITY_ERROR] = max_err
    metadata[nkat.SO8T_MIN_DET] = min_det
    return BakedModel(metadata, specs, recipes)


def _spec(source: TensorSource, name: str, changed: bool) -> TensorSpec:
    return TensorSpec(name, source.numpy_shape(name), F32 if changed else source.info(name).type)


def _f32(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32)


def _weight(source: TensorSource, name: str) -> np.ndarray:
    return source.dequantize(name).astype(np.float64)


def _raw(source: TensorSource, name: str) -> Callable[[], np.ndarray]:
    return lambda: source.raw(name)


def _gate_recipes(source: TensorSource, gates: Mapping[str, np.ndarray]) -> dict[str, Callable[[], np.ndarray]]:
    def gated(name: str) -> Callable[[], np.ndarray]:
        return lambda: _f32(apply_blocks_right(_weight(source, name), gates[name]))

    return {t.name: gated(t.name) if t.name in gates else _raw(source, t.name) for t in source.layout.tensors}


def _residual_recipes(
    source: TensorSource, plan: BakePlan
) -> tuple[dict[str, Callable[[], np.ndarray]], list[TensorSpec]]:
    """One recipe per tensor of the residual (and head) rotation; shapes are checked before any work."""
    model = _read_llama(source)
    q, d = plan.residual, model.d_model
    if q is None or q.shape[0] * 8 != d:
        raise InputError(f"residual rotation must have {d // 8} blocks for d_model {d}")
    head_widths = {h.shape[0] * 8 for h in plan.heads}
    if plan.heads and (len(plan.heads) != model.n_layers or head_widths != {model.head_dim_v}):
        raise InputError(f"head rotations must be {model.n_layers} layers of {model.head_dim_v // 8} blocks")
    if plan.heads and source.numpy_shape("blk.0.attn_output.weight")[1] != model.n_head * model.head_dim_v:
        raise UnsupportedModelError("attn_output's input width is not head_count × value head_dim")

    def embedding() -> np.ndarray:
        return _f32(apply_blocks_right(_weight(source, "token_embd.weight"), q))

    def ones(name: str) -> Callable[[], np.ndarray]:
        return lambda: np.ones(source.numpy_shape(name), dtype=np.float32)

    def reads_residual(name: str, norm_name: str, rows: np.ndarray | None = None) -> Callable[[], np.ndarray]:
        """W·diag(g)·Q, then (attn_v with heads) diag(R2ᵀ…)·W."""
        _require(source, name, 1, d)

        def compute() -> np.ndarray:
            w = _weight(source, name)
            w *= _weight(source, norm_name)[None, :]
            w = apply_blocks_right(w, q)
            return _f32(w if rows is None else apply_blocks_left_transposed(rows, w))

        return compute

    def writes_residual(name: str, columns: np.ndarray | None = None) -> Callable[[], np.ndarray]:
        """Qᵀ·W, then (attn_output with heads) W·diag(R2…)."""
        _require(source, name, 0, d)

        def compute() -> np.ndarray:
            w = apply_blocks_left_transposed(q, _weight(source, name))
            return _f32(w if columns is None else apply_blocks_right(w, columns))

        return compute

    def head_blocks(layer: int, role: str) -> np.ndarray | None:
        """R2 repeated once per KV head (attn_v rows) or per query head (attn_output columns)."""
        if not plan.heads or role not in ("attn_v", "attn_output"):
            return None
        return np.tile(plan.heads[layer], (model.n_head_kv if role == "attn_v" else model.n_head, 1, 1))

    recipes: dict[str, Callable[[], np.ndarray]] = {}
    specs: list[TensorSpec] = []
    for t in source.layout.tensors:
        name, changed = t.name, True
        match = _LAYER_TENSOR.fullmatch(name)
        layer, role = (int(match[1]), match[2]) if match else (None, name.removesuffix(".weight"))
        if role == "token_embd":
            recipes[name] = embedding
        elif role in _NORMS:
            recipes[name] = ones(name)
        elif role in _INPUT_NORM and layer is not None:
            recipes[name] = reads_residual(name, f"blk.{layer}.{_INPUT_NORM[role]}.weight", head_blocks(layer, role))
        elif role in _OUTPUT_SIDE and layer is not None:
            recipes[name] = writes_residual(name, head_blocks(layer, role))
        elif role == "output":
            recipes[name] = reads_residual(name, "output_norm.weight")
        elif role in _UNTOUCHED:
            recipes[name], changed = _raw(source, name), False
        else:
            raise UnsupportedModelError(f"cannot rotate the residual stream through tensor {name}")
        specs.append(_spec(source, name, changed))
    if model.tied:
        recipes["output.weight"] = reads_residual("token_embd.weight", "output_norm.weight")
        specs.append(TensorSpec("output.weight", source.numpy_shape("token_embd.weight"), F32))
    return recipes, specs


def _require(source: TensorSource, name: str, axis: int, width: int) -> None:
    shape = source.numpy_shape(name)
    if len(shape) != 2 or shape[axis] != width:
        raise UnsupportedModelError(f"{name} has shape {shape}; expected {width} on axis {axis} (d_model)")


def _read_llama(source: TensorSource) -> _Llama:
    """Shape facts of a llama-architecture model; others are refused (their norms or biases differ)."""
    layout = source.layout
    arch = layout.architecture
    if arch != "llama":
        raise UnsupportedModelError(f"SO8T residual rotation supports the llama architecture, not {arch}")
    d_model = source.numpy_shape("token_embd.weight")[1]
    n_layers = int(layout.get(Keys.LLM.BLOCK_COUNT.format(arch="llama"), 0))
    n_head = layout.get(Keys.Attention.HEAD_COUNT.format(arch="llama"))
    n_head_kv = layout.get(Keys.Attention.HEAD_COUNT_KV.format(arch="llama"), n_head)
    if not isinstance(n_head, int) or not isinstance(n_head_kv, int) or n_head_kv <= 0:
        raise UnsupportedModelError("SO8T baking needs one llama.attention.head_count(_kv) for all layers")
    block_count(d_model, "d_model")
    head_dim_v = source.numpy_shape("blk.0.attn_v.weight")[0] // n_head_kv
    return _Llama(d_model, n_layers, n_head, n_head_kv, head_dim_v, "output.weight" not in source)
