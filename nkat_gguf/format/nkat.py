"""The NKAT GGUF format, version 2: theta factors in GGUF metadata (spec: docs/NKAT_FORMAT.md).

One writer (`theta_metadata`) and one reader (`read_theta`), tested against each other and gguf-py.
Tensors are never added: a stock llama.cpp rejects a model file with tensors it does not use, but
ignores unknown metadata keys. Version 2 gives every weight its own rank (a weight that is not listed
has rank 0: no adapter there); version 1 files (one rank for all) are still read. This module owns every `nkat.*` key: the rest of the code names them
through the constants below, so the format is described in one place.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGUFValueType

from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import GGUFLayout, Value, read_layout
from nkat_gguf.math.theta import ThetaInt8

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PREFIX = "nkat."
MAX_ARRAY_ELEMENTS = 16 * 1024 * 1024  # Ollama refuses arrays over 64 Mi elements; stay well below
MAX_GAMMA = 16.0
# |factor| <= 127 * scale; with γ folded in, 127 * 16 * MAX_GAMMA = 32512 stays below F16's 65504
MAX_THETA_SCALE = 16.0
MAX_THETA_RANK = 4096

# theta (written by theta_metadata, read by read_theta)
VERSION = "nkat.version"
THETA_PREFIX = "nkat.theta."
THETA_RANK = "nkat.theta.rank"  # v1: the rank of every weight; v2: the largest per-weight rank
THETA_RANKS = "nkat.theta.ranks"  # v2 only: one rank per name of THETA_TENSORS
THETA_GAMMA = "nkat.theta.gamma"
THETA_TENSORS = "nkat.theta.tensors"
# provenance (written by convert)
SOURCE_SHA256 = "nkat.source.sha256"
SOURCE_NAME = "nkat.source.name"
REFERENCE_SHA256 = "nkat.reference.sha256"
OUTTYPE = "nkat.outtype"
CALIBRATION_METHOD = "nkat.calibration.method"
CALIBRATION_SHA256 = "nkat.calibration.sha256"
CALIBRATION_TOKENS = "nkat.calibration.tokens"
CALIBRATION_SOURCE = "nkat.calibration.source"
IMATRIX = "nkat.imatrix"
TOOL_VERSION = "nkat.tool.version"
ALLOCATION_METHOD = "nkat.allocation.method"  # "uniform", "budget" (θ ranks) or "mix" (types and θ ranks)
ALLOCATION_BUDGET = "nkat.allocation.budget_bytes"
ALLOCATION_MAX_WEIGHTS = "nkat.allocation.max_weights"
ALLOCATION_SENSITIVITY = "nkat.allocation.sensitivity"  # JSON: weight kind -> benefit per unit of energy
ALLOCATION_OP_BUDGET = "nkat.allocation.op_budget"  # mix: the most weights allowed θ (4 graph operations each)
ALLOCATION_TYPES = "nkat.allocation.types"  # mix: JSON {weight: ggml type} of the weights written above their base
# learned θ (convert --theta-train): present only when θ was trained after the closed-form fit
TRAIN_MODE = "nkat.train.mode"  # "block" or "model"
TRAIN_STEPS = "nkat.train.steps"  # Adam steps (per block with block)
TRAIN_LR = "nkat.train.lr"
TRAIN_TOKENS = "nkat.train.tokens"  # calibration tokens trained on
TRAIN_SEED = "nkat.train.seed"
TRAIN_DEVICE = "nkat.train.device"  # "cpu" or "cuda": a seed reproduces θ on the same kind of device
TRAIN_INITIAL_LOSS = "nkat.train.initial_loss"  # the closed form's loss (summed over blocks with block)
TRAIN_FINAL_LOSS = "nkat.train.final_loss"  # the loss of the factors the file holds
# SO8T bake (docs/SO8T.md): the rotation, then its QC figures under SO8T_QC_PREFIX + field name
SO8T_PREFIX = "nkat.so8t."
SO8T_MODE = "nkat.so8t.mode"
SO8T_SEED = "nkat.so8t.seed"
SO8T_CHECKPOINT = "nkat.so8t.checkpoint"
SO8T_HEADS = "nkat.so8t.heads"
SO8T_MAX_ORTHOGONALITY_ERROR = "nkat.so8t.max_orthogonality_error"
SO8T_MIN_DET = "nkat.so8t.min_det"
SO8T_QC_PREFIX = "nkat.so8t.qc."
PARTS = ("a", "a_scale", "b", "b_scale")  # the factor arrays of one weight: nkat.theta.<N>.<part>


def check_gamma(gamma: object) -> float:
    """γ scales the correction B·A: 1 applies it in full, 0 switches it off. Negative or absurd is refused.

    The one rule for γ wherever it comes from: the command line, a file, a request, the optimizer.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or math.isnan(gamma) or math.isinf(gamma):
        raise InputError(f"gamma must be a number, got {gamma!r}")
    if not 0.0 <= gamma <= MAX_GAMMA:
        raise InputError(f"gamma {gamma:g} is out of range [0, {MAX_GAMMA:g}]")
    return float(gamma)
# fitted sampling temperature, the confidence fit (docs/NKAT_FORMAT.md); may stand in any GGUF, with theta or
# without. "calibration" names the activation statistics only; files written before the rename hold the
# temperature under LEGACY_TEMPERATURE_KEYS, which are read too and dropped when a temperature is written.
TEMPERATURE = "nkat.confidence.temperature"
TEMPERATURE_SHA256 = "nkat.confidence.temperature.sha256"
TEMPERATURE_TOKENS = "nkat.confidence.temperature.tokens"
TEMPERATURE_GAMMA = "nkat.confidence.temperature.gamma"
LEGACY_TEMPERATURE_PREFIX = "nkat.calibration.temperature"
LEGACY_TEMPERATURE_KEYS = {
    TEMPERATURE: LEGACY_TEMPERATURE_PREFIX,
    TEMPERATURE_SHA256: "nkat.calibration.temperature.sha256",
    TEMPERATURE_TOKENS: "nkat.calibration.temperature.tokens",
    TEMPERATURE_GAMMA: "nkat.calibration.temperature.gamma",
}


@dataclass(frozen=True)
class NkatTheta:
    """theta for a set of weights (each with its own rank), with the default gamma and where it came from.

    A weight absent from `tensors` has rank 0: it gets no adapter and no graph operations.
    """

    gamma: float
    tensors: dict[str, ThetaInt8]
    provenance: dict[str, Any] = field(default_factory=dict)  # nkat.* keys other than theta

    @property
    def ranks(self) -> dict[str, int]:
        return {name: t.rank for name, t in sorted(self.tensors.items())}

    @property
    def rank(self) -> int:
        """The largest per-weight rank (0 without theta): the one figure to show for a uniform theta."""
        return max(self.ranks.values(), default=0)

    def metadata_bytes(self) -> int:
        """Bytes of the factor arrays (INT8 values and FLOAT32 scales) in the file."""
        return sum(t.a.size + t.b.size + 4 * (t.a_scale.size + t.b_scale.size) for t in self.tensors.values())

    def digest(self) -> str:
        """Content hash of the factors: keys the runtime's adapter cache."""
        h = hashlib.sha256(f"v{FORMAT_VERSION}".encode())
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name} r{t.rank} {t.a.shape} {t.b.shape}".encode())
            for arr in (t.a, t.a_scale, t.b, t.b_scale):
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def component_bytes(out_dim: int, in_dim: int) -> int:
    """File bytes of one rank component of a weight: its INT8 row of A and column of B, and two FLOAT32 scales."""
    return in_dim + out_dim + 2 * 4


def listing_bytes(name: str) -> int:
    """File bytes a weight costs once it carries theta, whatever its rank: its four keys with their array
    headers, its name in nkat.theta.tensors and its entry in nkat.theta.ranks."""
    array_header = 4 + 4 + 8  # value type, element type, element count
    keys = sum(8 + len(factor_key(name, part).encode()) + array_header for part in PARTS)
    return keys + 8 + len(name.encode()) + 4


def type_listing_bytes(name: str, ggml_type: str) -> int:
    """Bytes one upgraded weight adds to ALLOCATION_TYPES (`"name":"TYPE",` in `types_listing`)."""
    return len(f'"{name}":"{ggml_type}",'.encode())


def types_listing(upgrades: dict[str, str]) -> str:
    """The ALLOCATION_TYPES value: compact sorted JSON, so its size is what `type_listing_bytes` counts."""
    return json.dumps(dict(sorted(upgrades.items())), separators=(",", ":"))


def factor_key(name: str, part: str) -> str:
    """`nkat.theta.<N>.<part>` for part in a, a_scale, b, b_scale."""
    return f"{THETA_PREFIX}{name}.{part}"


def theta_metadata(theta: NkatTheta) -> dict[str, Any]:
    """The metadata keys of NKAT format v2, in writing order."""
    names = sorted(theta.tensors)
    for name in names:
        if theta.tensors[name].rank < 1:
            raise ValueError(f"{name}: a listed weight needs rank >= 1 (leave it out for rank 0)")
    out: dict[str, Any] = {
        VERSION: Value(GGUFValueType.UINT32, FORMAT_VERSION),
        THETA_RANK: Value(GGUFValueType.UINT32, theta.rank),
        THETA_GAMMA: Value(GGUFValueType.FLOAT32, float(theta.gamma)),
        THETA_TENSORS: names,
        THETA_RANKS: np.asarray([theta.tensors[n].rank for n in names], dtype=np.uint32),
    }
    for name in names:
        t = theta.tensors[name]
        for part, arr, dtype in (("a", t.a, np.int8), ("a_scale", t.a_scale, np.float32),
                                 ("b", t.b, np.int8), ("b_scale", t.b_scale, np.float32)):
            if part.endswith("_scale") and not np.all(np.isfinite(arr)):
                raise InputError(f"theta for {name} is not finite: the weights it corrects hold NaN or infinity")
            if arr.size > MAX_ARRAY_ELEMENTS:
                raise InputError(f"theta for {name} needs {arr.size} elements in one array; the limit is "
                                 f"{MAX_ARRAY_ELEMENTS} (lower its rank)")
            out[factor_key(name, part)] = np.ascontiguousarray(arr, dtype=dtype)
    for key, value in theta.provenance.items():
        if not key.startswith(PREFIX) or key.startswith(THETA_PREFIX) or key == VERSION:
            raise ValueError(f"provenance key {key!r} must be nkat.* and outside nkat.theta.*")
        out[key] = value
    return out


_THETA_PART_TYPES = {"a": GGUFValueType.INT8, "b": GGUFValueType.INT8,
                     "a_scale": GGUFValueType.FLOAT32, "b_scale": GGUFValueType.FLOAT32}
_INTEGER_TYPES = (GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32, GGUFValueType.UINT64,
                  GGUFValueType.INT8, GGUFValueType.INT16, GGUFValueType.INT32, GGUFValueType.INT64)
_REQUIRED = {1: (THETA_RANK, THETA_GAMMA, THETA_TENSORS), 2: (THETA_RANK, THETA_GAMMA, THETA_TENSORS, THETA_RANKS)}


def check_theta_parts(layout: GGUFLayout) -> None:
    """Every nkat.theta.* value has exactly the type the format says, and every scale a sane value.

    Nothing is cast: a FLOAT32 300.0 where INT8 belongs would wrap silently. Scales must be finite
    and in [0, MAX_THETA_SCALE], so that no dequantized factor, even with γ = MAX_GAMMA folded in,
    overflows the F16 an exported adapter holds (and NaN never reaches a result). A key of the
    nkat.theta namespace that the format does not define is refused: it would be a second statement
    no reader knows how to weigh.
    """
    path = layout.path
    for key, value in layout.metadata.items():
        if not key.startswith(THETA_PREFIX):
            continue
        part = key.rsplit(".", 1)[-1]
        if key == THETA_RANK:
            if value.type not in _INTEGER_TYPES or not 0 <= int(value.data) <= MAX_THETA_RANK:
                raise InputError(f"{path}: {key} must be a whole number from 0 to {MAX_THETA_RANK}, "
                                 f"got {value.type.name} {value.data!r}")
        elif key == THETA_RANKS:
            if value.type != GGUFValueType.ARRAY or value.sub_type not in _INTEGER_TYPES:
                raise InputError(f"{path}: {key} must be an array of whole numbers, got {_type_name(value)}")
            if value.data.size and not 0 <= int(value.data.min()) <= int(value.data.max()) <= MAX_THETA_RANK:
                raise InputError(f"{path}: {key} holds ranks outside 0 to {MAX_THETA_RANK}")
        elif key == THETA_GAMMA:
            if value.type not in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
                raise InputError(f"{path}: {key} must be FLOAT32, got {value.type.name} {value.data!r}")
            try:
                check_gamma(value.data)
            except InputError as exc:
                raise InputError(f"{path}: {key}: {exc}") from None
        elif key == THETA_TENSORS:
            if value.type != GGUFValueType.ARRAY or value.sub_type != GGUFValueType.STRING:
                raise InputError(f"{path}: {key} must be an array of tensor names (strings), got {_type_name(value)}")
        elif part in _THETA_PART_TYPES and key != f"{THETA_PREFIX}{part}":
            expected = _THETA_PART_TYPES[part]
            if value.type != GGUFValueType.ARRAY or value.sub_type != expected:
                raise InputError(f"{path}: {key} must be an array of {expected.name}, got {_type_name(value)}")
            if part.endswith("_scale"):
                _check_scales(path, key, value.data)
        else:
            raise InputError(f"{path}: {key} is not a key of the NKAT format (nkat.theta.* holds only "
                             f"{THETA_RANK}, {THETA_RANKS}, {THETA_GAMMA}, {THETA_TENSORS} and "
                             f"{THETA_PREFIX}<weight>.{{{', '.join(PARTS)}}})")


def _type_name(value: Value) -> str:
    """`an array of INT16`, `a single FLOAT32`: what a message says was found."""
    if value.type == GGUFValueType.ARRAY and value.sub_type is not None:
        return f"an array of {value.sub_type.name}"
    return f"a single {value.type.name}"


def _check_scales(path: Path, key: str, scales: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(scales) | (scales < 0) | (scales > MAX_THETA_SCALE))
    if bad.size:
        raise InputError(f"{path}: {key}[{bad[0]}] is {scales[bad[0]]}; a theta scale must be finite and in "
                         f"[0, {MAX_THETA_SCALE:g}]")


def _check_version(layout: GGUFLayout) -> int:
    value = layout.metadata[VERSION]
    if value.type not in _INTEGER_TYPES:
        raise InputError(f"{layout.path}: {VERSION} must be a whole number, got {value.type.name} {value.data!r}")
    if value.data not in READABLE_VERSIONS:
        raise InputError(f"{layout.path}: {VERSION} = {value.data}: this NKAT format version is not supported "
                         f"(this tool reads {', '.join(map(str, READABLE_VERSIONS))})")
    return int(value.data)


def _listed_ranks(layout: GGUFLayout, version: int, names: list[str]) -> list[int]:
    """Each listed weight's rank, checked against every other key that states it.

    v1 states one rank for all (`nkat.theta.rank`); v2 one per name (`nkat.theta.ranks`), with
    `nkat.theta.rank` their largest. `nkat.theta.rank = 0` means "no theta", so it cannot stand
    beside listed weights, nor a positive rank beside none.
    """
    path = layout.path
    missing = [k for k in _REQUIRED[version] if k not in layout.metadata]
    if missing:
        raise InputError(f"{path}: {', '.join(missing)} missing: NKAT version {version} requires "
                         f"{', '.join(_REQUIRED[version])}")
    if version == 1 and THETA_RANKS in layout.metadata:
        raise InputError(f"{path}: {THETA_RANKS} is a version 2 key, but {VERSION} = 1 (one rank for all weights)")
    rank = int(layout.get(THETA_RANK))
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{path}: {THETA_TENSORS} lists {twice} twice")
    if rank == 0 and names:
        raise InputError(f"{path}: {THETA_RANK} = 0 (no theta) but {THETA_TENSORS} lists {len(names)} weights "
                         f"(first {names[0]})")
    if rank > 0 and not names:
        raise InputError(f"{path}: {THETA_RANK} = {rank} but {THETA_TENSORS} lists no weight (rank 0 means no theta)")
    if version == 1:
        return [rank] * len(names)
    ranks = [int(r) for r in layout.get(THETA_RANKS)]
    if len(ranks) != len(names):
        raise InputError(f"{path}: {THETA_RANKS} has {len(ranks)} elements but {THETA_TENSORS} lists "
                         f"{len(names)} weights: one rank per name")
    if ranks and min(ranks) < 1:
        at = ranks.index(min(ranks))
        raise InputError(f"{path}: {THETA_RANKS}[{at}] = {ranks[at]} for {names[at]}, below 1 "
                         "(a weight without theta is not listed)")
    if rank != max(ranks, default=0):
        raise InputError(f"{path}: {THETA_RANK} = {rank} but the largest of {THETA_RANKS} is {max(ranks)} "
                         f"({THETA_RANK} must equal it)")
    return ranks


def _check_unlisted(layout: GGUFLayout, names: list[str]) -> None:
    """Factor keys of a weight that is not listed: the file states theta for more weights than it lists."""
    listed = {factor_key(n, p) for n in names for p in PARTS}
    for key in layout.metadata:
        if key.startswith(THETA_PREFIX) and key.rsplit(".", 1)[-1] in PARTS and key not in listed:
            name = key[len(THETA_PREFIX):].rsplit(".", 1)[0]
            raise InputError(f"{layout.path}: {key} holds factors for {name}, which {THETA_TENSORS} does not list "
                             f"({len(names)} listed)")


def _factor_shapes(path: Path, name: str, rank: int, rank_source: str, shape: tuple[int, int],
                   parts: dict[str, np.ndarray | None]) -> None:
    """Each factor array has the size its weight's rank and shape give; the message names both sides."""
    out_dim, in_dim = shape
    for part in ("a_scale", "b_scale"):
        arr = parts[part]
        if arr is None:
            raise InputError(f"{path}: {factor_key(name, part)} is missing ({name} is listed in {THETA_TENSORS})")
        if arr.size != rank:
            raise InputError(f"{path}: {factor_key(name, part)} has {arr.size} elements (rank {arr.size}) but "
                             f"{rank_source} gives {name} rank {rank}")
    for part, dim, label in (("a", in_dim, "in"), ("b", out_dim, "out")):
        arr = parts[part]
        if arr is None:
            raise InputError(f"{path}: {factor_key(name, part)} is missing ({name} is listed in {THETA_TENSORS})")
        if arr.size != rank * dim:
            raise InputError(f"{path}: {factor_key(name, part)} has {arr.size} elements, expected rank × {label} = "
                             f"{rank} × {dim} = {rank * dim} (rank from {rank_source}, {label} from the shape of {name})")


def read_theta(source: str | Path | GGUFLayout) -> NkatTheta | None:
    """theta stored in a GGUF (v1 or v2), or None for a file without NKAT metadata.

    The one reader every command uses: a file whose keys contradict each other (spec:
    docs/NKAT_FORMAT.md, "Consistency") is refused in one line that names both statements.
    """
    layout = source if isinstance(source, GGUFLayout) else read_layout(source)
    if VERSION not in layout.metadata:
        return None
    path = layout.path
    version = _check_version(layout)
    check_theta_parts(layout)
    names = list(layout.get(THETA_TENSORS, []))
    ranks = _listed_ranks(layout, version, names)
    shapes = {t.name: tuple(reversed(t.shape)) for t in layout.tensors}
    for name in names:
        if name not in shapes or len(shapes[name]) != 2:
            raise InputError(f"{path}: {THETA_TENSORS} lists {name}, which is not a 2-D tensor of the model")
    _check_unlisted(layout, names)
    rank_source = THETA_RANK if version == 1 else THETA_RANKS
    tensors = {}
    for name, rank in zip(names, ranks):
        out_dim, in_dim = shapes[name]
        parts = {p: layout.get(factor_key(name, p)) for p in PARTS}
        _factor_shapes(path, name, rank, rank_source, (out_dim, in_dim), parts)
        tensors[name] = ThetaInt8(
            parts["a"].astype(np.int8, copy=False).reshape(rank, in_dim),
            parts["a_scale"].astype(np.float32, copy=False),
            parts["b"].astype(np.int8, copy=False).reshape(out_dim, rank),
            parts["b_scale"].astype(np.float32, copy=False),
        )
    provenance = {k: v.python() for k, v in layout.metadata.items()
                  if k.startswith(PREFIX) and not k.startswith(THETA_PREFIX) and k != VERSION}
    return NkatTheta(float(layout.get(THETA_GAMMA)), tensors, provenance)


@dataclass(frozen=True)
class CalibratedTemperature:
    """The T minimising NLL of softmax(z / T) on a text, and what it was fitted on."""

    temperature: float
    text_sha256: str
    tokens: int  # tokens scored in the fit
    gamma: float | None  # theta's γ during the fit; None: theta off or absent

    def metadata(self) -> dict[str, Value]:
        out = {TEMPERATURE: Value(GGUFValueType.FLOAT32, float(self.temperature)),
               TEMPERATURE_SHA256: Value(GGUFValueType.STRING, self.text_sha256),
               TEMPERATURE_TOKENS: Value(GGUFValueType.UINT32, int(self.tokens))}
        if self.gamma is not None:
            out[TEMPERATURE_GAMMA] = Value(GGUFValueType.FLOAT32, float(self.gamma))
        return out


def read_temperature(source: str | Path | GGUFLayout) -> CalibratedTemperature | None:
    """The calibrated temperature stored in a GGUF, or None; a malformed one is refused in one line."""
    layout = source if isinstance(source, GGUFLayout) else read_layout(source)
    keys = {key: key for key in LEGACY_TEMPERATURE_KEYS} if TEMPERATURE in layout.metadata else LEGACY_TEMPERATURE_KEYS
    value = layout.get(keys[TEMPERATURE])
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{layout.path}: {keys[TEMPERATURE]} must be a positive number, got {value!r}")
    gamma = layout.get(keys[TEMPERATURE_GAMMA])
    return CalibratedTemperature(float(value), str(layout.get(keys[TEMPERATURE_SHA256], "")),
                                 int(layout.get(keys[TEMPERATURE_TOKENS], 0)), None if gamma is None else float(gamma))
