"""The NKAT GGUF format, version 1: theta factors in GGUF metadata (spec: docs/NKAT_FORMAT.md).

One writer (`theta_metadata`) and one reader (`read_theta`), tested against each other and gguf-py.
Tensors are never added: a stock llama.cpp rejects a model file with tensors it does not use, but
ignores unknown metadata keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .gguf_file import GGUFLayout, Value, ValueType, read_layout
from .theta import ThetaInt8

FORMAT_VERSION = 1
PREFIX = "nkat."
MAX_ARRAY_ELEMENTS = 16 * 1024 * 1024  # Ollama refuses arrays over 64 Mi elements; stay well below


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
    return f"{PREFIX}theta.{name}.{part}"


def theta_metadata(theta: NkatTheta) -> dict[str, Any]:
    """The metadata keys of NKAT format v1, in writing order."""
    out: dict[str, Any] = {
        "nkat.version": Value(ValueType.UINT32, FORMAT_VERSION),
        "nkat.theta.rank": Value(ValueType.UINT32, theta.rank),
        "nkat.theta.gamma": Value(ValueType.FLOAT32, float(theta.gamma)),
        "nkat.theta.tensors": sorted(theta.tensors),
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
        if not key.startswith(PREFIX) or key.startswith(PREFIX + "theta."):
            raise ValueError(f"provenance key {key!r} must be nkat.* and outside nkat.theta.*")
        out[key] = value
    return out


def read_theta(source: str | Path | GGUFLayout) -> NkatTheta | None:
    """theta stored in a GGUF, or None for a file without NKAT metadata. Checks every shape."""
    layout = source if isinstance(source, GGUFLayout) else read_layout(source)
    version = layout.get("nkat.version")
    if version is None:
        return None
    path = layout.path
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: NKAT format version {version} is not supported (this tool reads {FORMAT_VERSION})")
    try:
        rank = int(layout.get("nkat.theta.rank"))
        gamma = float(layout.get("nkat.theta.gamma"))
        names = list(layout.get("nkat.theta.tensors"))
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
                  if k.startswith(PREFIX) and not k.startswith(PREFIX + "theta.") and k != "nkat.version"}
    return NkatTheta(rank, gamma, tensors, provenance)
