"""Malformed inputs for the corpus test, built from a tiny model (the default model's tokenizer) with gguf-py
and byte edits: nothing binary is committed.

A case is a command line with placeholders, the file it needs (built on demand into a scratch directory)
and the words its one-line error must contain once every path of the run is removed from it: the key,
value or bound that was wrong, never a word the file's own name could supply. Placeholders: {tiny} the F32 tiny model, {nkat} the tiny
NKAT file, {plain} a tiny Q4_0 model without theta, {file} the case's own malformed file, {out} the
case's empty output directory.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType
from safetensors.numpy import save_file

from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import GGUF_MAGIC, TensorSpec, Value, read_layout, write_gguf, write_with_metadata

Build = Callable[["Inputs", Path], None]


@dataclass(frozen=True)
class Inputs:
    """The valid files every malformed one is derived from."""

    tiny: Path  # F32, 2 layers, d=64
    nkat: Path  # tiny converted to Q4_0 with theta rank 4
    plain: Path  # Q4_0 without theta


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    expect: str | tuple[str, ...] | None  # words of the error (lower case), each required; None: a valid control

    @property
    def words(self) -> tuple[str, ...]:
        return () if self.expect is None else (self.expect,) if isinstance(self.expect, str) else self.expect
    build: Build | None = None
    suffix: str = ".gguf"
    slow: bool = False
    creates: tuple[str, ...] = field(default_factory=tuple)  # controls: files that must appear in {out}


# ---- byte-level GGUF surgery ---------------------------------------------------------------------


@dataclass
class Parts:
    """A GGUF cut into its records, to be edited and put back together (counts and padding recomputed)."""

    version: int
    kvs: list[bytes]
    infos: list[bytearray]
    data: bytes
    alignment: int = 32

    def assemble(self, n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
        head = GGUF_MAGIC + struct.pack("<IQQ", self.version, len(self.infos) if n_tensors is None else n_tensors,
                                        len(self.kvs) if n_kv is None else n_kv)
        body = head + b"".join(self.kvs) + b"".join(self.infos)
        return body + b"\0" * ((-len(body)) % self.alignment) + self.data


def split(path: Path) -> Parts:
    layout = read_layout(path)
    raw = path.read_bytes()
    kvs = [raw[start:end] for start, end in layout.kv_spans.values()]
    infos, pos = [], layout.tensor_infos_span[0]
    for _ in layout.tensors:
        start = pos
        (n,) = struct.unpack_from("<Q", raw, pos)
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        pos += 4 + 8 * n_dims + 4 + 8
        infos.append(bytearray(raw[start:pos]))
    return Parts(layout.version, kvs, infos, raw[layout.data_offset:], layout.alignment)


def info_fields(info: bytearray) -> tuple[int, int, int, int]:
    """Byte positions in one tensor info: n_dims, first dim, type, offset."""
    (n,) = struct.unpack_from("<Q", info, 0)
    dims_at = 8 + n
    (n_dims,) = struct.unpack_from("<I", info, dims_at)
    type_at = dims_at + 4 + 8 * n_dims
    return dims_at, dims_at + 4, type_at, type_at + 4


def _kv_value_at(parts: Parts, key: str) -> tuple[int, int]:
    """(index of the KV record, byte position of its type field)."""
    for i, kv in enumerate(parts.kvs):
        (n,) = struct.unpack_from("<Q", kv, 0)
        if kv[8:8 + n] == key.encode():
            return i, 8 + n
    raise KeyError(key)


def raw_edit(edit: Callable[[Parts], bytes], base: str = "plain") -> Build:
    def build(inputs: Inputs, dst: Path) -> None:
        dst.write_bytes(edit(split(getattr(inputs, base))))
    return build


def patch(offset: int, fmt: str, value: int, base: str = "plain") -> Build:
    def build(inputs: Inputs, dst: Path) -> None:
        raw = bytearray(getattr(inputs, base).read_bytes())
        struct.pack_into(fmt, raw, offset, value)
        dst.write_bytes(bytes(raw))
    return build


def kv_patch(key: str, delta: int, fmt: str, value: int) -> Build:
    """Overwrite bytes at (type field of `key`) + delta."""
    def edit(parts: Parts) -> bytes:
        i, type_at = _kv_value_at(parts, key)
        record = bytearray(parts.kvs[i])
        struct.pack_into(fmt, record, type_at + delta, value)
        parts.kvs[i] = bytes(record)
        return parts.assemble()
    return raw_edit(edit)


def info_patch(tensor: int, which: str, fmt: str, value: int) -> Build:
    def edit(parts: Parts) -> bytes:
        info = parts.infos[tensor]
        positions = dict(zip(("n_dims", "dim0", "type", "offset"), info_fields(info)))
        struct.pack_into(fmt, info, positions[which], value)
        return parts.assemble()
    return raw_edit(edit)


def truncated(fraction: float, base: str = "plain") -> Build:
    def build(inputs: Inputs, dst: Path) -> None:
        raw = getattr(inputs, base).read_bytes()
        dst.write_bytes(raw[: int(len(raw) * fraction)])
    return build


def truncated_at(n_bytes: int) -> Build:
    def build(inputs: Inputs, dst: Path) -> None:
        dst.write_bytes(inputs.plain.read_bytes()[:n_bytes])
    return build


def bytes_file(content: bytes) -> Build:
    def build(inputs: Inputs, dst: Path) -> None:
        dst.write_bytes(content)
    return build


def with_metadata(changes: dict[str, object], base: str = "plain", drop: tuple[str, ...] = ()) -> Build:
    """`base` with keys replaced (typed Values) or, for keys in `drop`, removed."""
    def build(inputs: Inputs, dst: Path) -> None:
        write_with_metadata(getattr(inputs, base), dst, changes, drop_prefixes=drop)
    return build


def u32(v: int) -> Value:
    return Value(GGUFValueType.UINT32, v)


def f32(v: float) -> Value:
    return Value(GGUFValueType.FLOAT32, v)


def string(v: str) -> Value:
    return Value(GGUFValueType.STRING, v)


def array(values: list | np.ndarray, sub: GGUFValueType) -> Value:
    return Value(GGUFValueType.ARRAY, values if sub == GGUFValueType.STRING else np.asarray(values), sub)


def theta_key(part: str, tensor: str = "blk.0.attn_q.weight") -> str:
    return f"{nkat.THETA_PREFIX}{tensor}.{part}"


def theta_part(part: str, transform: Callable[[np.ndarray], Value]) -> Build:
    """The NKAT file with one theta array replaced by transform(its current values)."""
    def build(inputs: Inputs, dst: Path) -> None:
        current = read_layout(inputs.nkat).get(theta_key(part))
        write_with_metadata(inputs.nkat, dst, {theta_key(part): transform(np.array(current))})
    return build


def scale_set(part: str, value: float) -> Build:
    def transform(arr: np.ndarray) -> Value:
        arr = arr.astype(np.float32)
        arr[0] = value
        return array(arr, GGUFValueType.FLOAT32)
    return theta_part(part, transform)


def imatrix_gguf(tensors: dict[str, np.ndarray], general_type: str = "imatrix") -> Build:
    """An imatrix GGUF: F32 tensors given in numpy order (the writer reverses them into ggml order)."""
    def build(inputs: Inputs, dst: Path) -> None:
        specs = [TensorSpec(n, a.shape, GGMLQuantizationType.F32) for n, a in tensors.items()]
        write_gguf(dst, {"general.architecture": "llama", "general.type": general_type}, specs,
                   lambda s: tensors[s.name].astype(np.float32))
    return build


def legacy_imatrix(entries: list[tuple[str, int, np.ndarray]], n_entries: int | None = None) -> Build:
    def build(inputs: Inputs, dst: Path) -> None:
        out = [struct.pack("<i", len(entries) if n_entries is None else n_entries)]
        for name, ncall, values in entries:
            raw = name.encode()
            out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size),
                    values.astype("<f4").tobytes()]
        dst.write_bytes(b"".join(out))
    return build


def safetensors_file(tensors: dict[str, np.ndarray]) -> Build:
    def build(inputs: Inputs, dst: Path) -> None:
        save_file(tensors, str(dst))
    return build


def cut_end(build: Build, n_bytes: int) -> Build:
    """What `build` writes, less its last `n_bytes`."""
    def cut(inputs: Inputs, dst: Path) -> None:
        build(inputs, dst)
        dst.write_bytes(dst.read_bytes()[:-n_bytes])
    return cut
