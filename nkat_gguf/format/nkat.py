"""The NKAT GGUF format, version 1: theta factors in GGUF metadata (spec: docs/NKAT_FORMAT.md).

One writer (`theta_metadata`) and one reader (`read_theta`), tested against each other and gguf-py.
Tensors are never added: a stock llama.cpp rejects a model file with tensors it does not use, but
ignores unknown metadata keys. This module owns every `nkat.*` key: the rest of the code names them
through the constants below, so the format is described in one place.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGUFValueType

from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import GGUFLayout, Value, read_layout
from nkat_gguf.math.theta import ThetaInt8

FORMAT_VERSION = 1
PREFIX = "nkat."
MAX_ARRAY_ELEMENTS = 16 * 1024 * 1024  # Ollama refuses arrays over 64 Mi elements; stay well below
MAX_GAMMA = 16.0

# theta (written by theta_metadata, read by read_theta)
VERSION = "nkat.version"
THETA_PREFIX = "nkat.theta."
THETA_RANK = "nkat.theta.rank"
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
# SO8T bake (docs/SO8T.md): the rotation, then its QC figures under SO8T_QC_PREFIX + field name
SO8T_PREFIX = "nkat.so8t."
SO8T_MODE = "nkat.so8t.mode"
SO8T_SEED = "nkat.so8t.seed"
SO8T_CHECKPOINT = "nkat.so8t.checkpoint"
SO8T_HEADS = "nkat.so8t.heads"
SO8T_MAX_ORTHOGONALITY_ERROR = "nkat.so8t.max_orthogonality_error"
SO8T_MIN_DET = "nkat.so8t.min_det"
SO8T_QC_PREFIX = "nkat.so8t.qc."


def check_gamma(gamma: object) -> float:
    """γ scales the correction B·A: 1 applies it in full, 0 switches it off. Negative or absurd is refused.

    The one rule for γ wherever it comes from: the command line, a file, a request, the optimizer.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or math.isnan(gamma) or math.isinf(gamma):
        raise InputError(f"gamma must be a finite number, got {gamma!r}")
    if not 0.0 <= gamma <= MAX_GAMMA:
        raise InputError(f"gamma {gamma:g} is out of range [0, {MAX_GAMMA:g}]")
    return float(gamma)
# calibrated sampling temperature (docs/NKAT_FORMAT.md); may stand in any GGUF, with theta or without
TEMPERATURE = "nkat.calibration.temperature"
TEMPERATURE_SHA256 = "nkat.calibration.temperature.sha256"
TEMPERATURE_TOKENS = "nkat.calibration.temperature.tokens"
TEMPERATURE_GAMMA = "nkat.calibration.temperature.gamma"


@dataclass(frozen=True)
class NkatTheta:
    """theta for a set of weights, with the default gamma and where it came from."""

    rank: int
    gamma: float
    tensors: dict[str, ThetaInt8]
    provenance: dict[str, Any] = field(default_factory=dict)  # nkat.* keys other than theta

    def digest(self) -> str:
        """Content hash of the factors: keys the runtime's adapter cache."""
        h = hashlib.sha256(f"v{FORMAT_VERSION} r{self.rank}".encode())
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(name.encode())
            for arr in (t.a, t.a_scale, t.b, t.b_scale):
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def _key(name: str, part: str) -> str:
    return f"{THETA_PREFIX}{name}.{part}"


def theta_metadata(theta: NkatTheta) -> dict[str, Any]:
    """The metadata keys of NKAT format v1, in writing order."""
    out: dict[str, Any] = {
        VERSION: Value(GGUFValueType.UINT32, FORMAT_VERSION),
        THETA_RANK: Value(GGUFValueType.UINT32, theta.rank),
        THETA_GAMMA: Value(GGUFValueType.FLOAT32, float(theta.gamma)),
        THETA_TENSORS: sorted(theta.tensors),
    }
    for name in sorted(theta.tensors):
        t = theta.tensors[name]
        if t.rank != theta.rank:
            raise ValueError(f"{name}: rank {t.rank} differs from the file's rank {theta.rank}")
        for part, arr, dtype in (("a", t.a, np.int8), ("a_scale", t.a_scale, np.float32),
                                 ("b", t.b, np.int8), ("b_scale", t.b_scale, np.float32)):
            if arr.size > MAX_ARRAY_ELEMENTS:
                raise InputError(f"theta for {name} needs {arr.size} elements in one array; the limit is "
                                 f"{MAX_ARRAY_ELEMENTS} (lower --theta-rank)")
            out[_key(name, part)] = np.ascontiguousarray(arr, dtype=dtype)
    for key, value in theta.provenance.items():
        if not key.startswith(PREFIX) or key.startswith(THETA_PREFIX):
            raise ValueError(f"provenance key {key!r} must be nkat.* and outside nkat.theta.*")
        out[key] = value
    return out


def read_theta(source: str | Path | GGUFLayout) -> NkatTheta | None:
    """theta stored in a GGUF, or None for a file without NKAT metadata. Checks every shape."""
    layout = source if isinstance(source, GGUFLayout) else read_layout(source)
    version = layout.get(VERSION)
    if version is None:
        return None
    path = layout.path
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: NKAT format version {version} is not supported (this tool reads {FORMAT_VERSION})")
    try:
        rank = int(layout.get(THETA_RANK))
        gamma = float(layout.get(THETA_GAMMA))
        names = list(layout.get(THETA_TENSORS))
    except TypeError:
        raise InputError(f"{path}: NKAT metadata is incomplete (nkat.theta.rank/gamma/tensors)") from None
    shapes = {t.name: tuple(reversed(t.shape)) for t in layout.tensors}
    tensors = {}
    for name in names:
        if name not in shapes or len(shapes[name]) != 2:
            raise InputError(f"{path}: theta names {name}, which is not a 2-D tensor of the model")
        out_dim, in_dim = shapes[name]
        parts = {p: layout.get(_key(name, p)) for p in ("a", "a_scale", "b", "b_scale")}
        expected = {"a": rank * in_dim, "a_scale": rank, "b": out_dim * rank, "b_scale": rank}
        for part, arr in parts.items():
            if not isinstance(arr, np.ndarray) or arr.size != expected[part]:
                got = "missing" if not isinstance(arr, np.ndarray) else f"{arr.size} elements"
                raise InputError(f"{path}: {_key(name, part)} is {got}, expected {expected[part]} elements")
        tensors[name] = ThetaInt8(
            parts["a"].astype(np.int8, copy=False).reshape(rank, in_dim),
            parts["a_scale"].astype(np.float32, copy=False),
            parts["b"].astype(np.int8, copy=False).reshape(out_dim, rank),
            parts["b_scale"].astype(np.float32, copy=False),
        )
    provenance = {k: v.python() for k, v in layout.metadata.items()
                  if k.startswith(PREFIX) and not k.startswith(THETA_PREFIX) and k != VERSION}
    return NkatTheta(rank, gamma, tensors, provenance)


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
    value = layout.get(TEMPERATURE)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{layout.path}: {TEMPERATURE} must be a positive number, got {value!r}")
    gamma = layout.get(TEMPERATURE_GAMMA)
    return CalibratedTemperature(float(value), str(layout.get(TEMPERATURE_SHA256, "")),
                                 int(layout.get(TEMPERATURE_TOKENS, 0)), None if gamma is None else float(gamma))
