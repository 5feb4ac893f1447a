"""GGUF container I/O at the byte level: a fast metadata reader and a byte-exact metadata appender.

Read in the order of the format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
header -> key/values -> tensor infos -> padding -> tensor data. gguf-py's GGUFReader builds one
numpy object per array element (a 1 M-element array takes ~23 s); here a numeric array is one
`np.frombuffer`, so NKAT's INT8 theta arrays load in milliseconds.

`write_with_metadata` copies a GGUF's tensor infos and tensor data unchanged and rewrites only the
key/value section, so "every tensor of the quantized model unchanged" holds byte for byte.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from nkat_gguf.errors import InputError
from nkat_gguf.format.atomic import atomic_output

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16  # llama.cpp accepts any power of two; beyond this the padding alone is absurd
GGML_MAX_DIMS = 4  # ggml.h: a tensor has at most four dimensions
LAYOUTS_KEPT = 8  # files whose parsed layout read_layout keeps (a convert reads about five files' layouts)


_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_TYPE_OF_DTYPE = {dt: t for t, dt in _SCALAR_DTYPES.items() if t != GGUFValueType.BOOL}
INTEGER_TYPES = (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                 GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)
FLOAT_TYPES = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)


@dataclass(frozen=True)
class Value:
    """A typed metadata value. Arrays hold a numpy array (numeric) or a list of str (STRING)."""

    type: GGUFValueType
    data: Any
    sub_type: GGUFValueType | None = None

    def python(self) -> Any:
        """The value as plain Python (scalars) or numpy/list (arrays)."""
        if self.type == GGUFValueType.BOOL:
            return bool(self.data)
        return self.data


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 = row length first), as in the file
    type: GGMLQuantizationType
    offset: int  # relative to the start of the data section

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return math.prod(self.shape) // block * size  # Python ints: a product of huge dims cannot wrap


@dataclass(frozen=True)
class GGUFLayout:
    """Everything before the tensor data, plus where each section starts in the file."""

    path: Path
    version: int
    metadata: dict[str, Value]
    kv_spans: dict[str, tuple[int, int]]  # key -> (start, end) byte span of the whole KV record
    tensors: list[TensorInfo]
    tensor_infos_span: tuple[int, int]
    alignment: int
    data_offset: int
    file_size: int

    def get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key)
        return default if value is None else value.python()

    @property
    def architecture(self) -> str:
        value = self.metadata.get(Keys.General.ARCHITECTURE)
        if value is None:
            raise InputError(f"{self.path}: GGUF has no general.architecture")
        arch = value.python()
        if not isinstance(arch, str):
            raise InputError(f"{self.path}: general.architecture is {value.type.name} {arch!r}, expected a string")
        return arch


class _Cursor:
    """Sequential little-endian reads over a buffer; running past the end means a truncated file."""

    def __init__(self, buf: memoryview | bytes, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path
        self.where = "the header"  # the record being read, for messages: "key/value 3 of 27"

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise InputError(f"truncated GGUF: {self.path} ends at byte {len(self.buf)}, inside {self.where}"
                             f" (reading {n} bytes at byte {self.pos})")
        view = memoryview(self.buf)[self.pos:end]
        self.pos = end
        return view

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.take(n)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType) -> Value:
        if vtype == GGUFValueType.STRING:
            return Value(vtype, self.string())
        if vtype == GGUFValueType.ARRAY:
            sub = self._value_type()
            count = self.unpack("<Q")
            if sub == GGUFValueType.STRING:
                return Value(vtype, [self.string() for _ in range(count)], sub)
            if sub == GGUFValueType.ARRAY:  # gguf.cpp refuses nested arrays too
                raise InputError(f"corrupt GGUF: {self.path} has a nested array at byte {self.pos - 12} "
                                 f"({self.where})")
            dtype = _SCALAR_DTYPES[sub]
            arr = np.frombuffer(self.take(dtype.itemsize * count), dtype=dtype).copy()
            return Value(vtype, arr, sub)
        dtype = _SCALAR_DTYPES[vtype]
        item = np.frombuffer(self.take(dtype.itemsize), dtype=dtype)[0].item()
        return Value(vtype, item)

    def _value_type(self) -> GGUFValueType:
        raw = self.unpack("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise InputError(f"corrupt GGUF: {self.path} has unknown value type {raw} at byte {self.pos - 4} "
                             f"({self.where})") from None


# resolved path -> (file size, digest of the bytes before the tensor data, the layout parsed from them)
_layouts: dict[Path, tuple[int, bytes, GGUFLayout]] = {}


def read_layout(path: str | Path) -> GGUFLayout:
    """Parse header, metadata and tensor infos; validate that the tensor data is all there.

    A convert reads the same few files' layouts many times, and parsing a large tokenizer's strings takes
    about a second each time, so the last LAYOUTS_KEPT files' layouts are kept: one is reused only while the
    file has the same size and the same bytes before its tensor data (hashed, milliseconds; a timestamp can
    miss a rewrite within its clock tick), which are all the layout is read from. The layout returned is
    shared: do not change it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    size = path.stat().st_size
    if size < 24:
        raise InputError(f"not a GGUF file: {path} ({size} bytes, less than the 24 of a GGUF header)")
    key = path.resolve()
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != GGUF_MAGIC:
            raise InputError(f"not a GGUF file: {path} (magic {bytes(mm[:4])!r}, expected b'GGUF')")
        kept = _layouts.pop(key, None)
        if kept is not None and kept[0] == size and hashlib.blake2b(mm[:kept[2].data_offset]).digest() == kept[1]:
            layout = kept[2] if kept[2].path == path else replace(kept[2], path=path)
        else:
            cur = _Cursor(mm, path)
            try:
                layout = _parse(cur, path, size)
            finally:
                cur.buf = b""  # release the mmap export before closing
            kept = (size, hashlib.blake2b(mm[:layout.data_offset]).digest(), layout)
    _layouts[key] = kept  # last used last: the first is the one dropped
    while len(_layouts) > LAYOUTS_KEPT:
        del _layouts[next(iter(_layouts))]
    return layout


def _parse(cur: _Cursor, path: Path, size: int) -> GGUFLayout:
    cur.take(4)
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise InputError(f"unsupported GGUF version {version} in {path} (expected 2 or 3)")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    metadata: dict[str, Value] = {}
    spans: dict[str, tuple[int, int]] = {}
    for i in range(n_kv):
        cur.where = f"key/value {i + 1} of the {n_kv} the header announces"
        start = cur.pos
        key = cur.string()
        if key in metadata:
            raise InputError(f"corrupt GGUF: {path} has the key {key!r} twice")
        metadata[key] = cur.value(cur._value_type())
        spans[key] = (start, cur.pos)
    infos_start = cur.pos
    tensors = []
    for i in range(n_tensors):
        cur.where = f"tensor info {i + 1} of the {n_tensors} the header announces (after {n_kv} key/values)"
        name = cur.string()
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise InputError(f"corrupt GGUF: {path}: tensor {name!r} has {n_dims} dimensions (1 to {GGML_MAX_DIMS}), "
                             f"in {cur.where}")
        shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
        raw_type = cur.unpack("<I")
        try:
            ttype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise InputError(f"unsupported tensor type {raw_type} for {name!r} in {path}, in {cur.where}") from None
        info = TensorInfo(name, shape, ttype, cur.unpack("<Q"))
        _check_tensor_size(info, path)
        tensors.append(info)
    if len({t.name for t in tensors}) != len(tensors):
        twice = next(t.name for i, t in enumerate(tensors) if t.name in {u.name for u in tensors[:i]})
        raise InputError(f"corrupt GGUF: {path} names the tensor {twice!r} twice")
    infos_end = cur.pos
    alignment = _alignment(metadata, path)
    data_offset = -(-infos_end // alignment) * alignment
    needed = max((data_offset + t.offset + t.n_bytes for t in tensors), default=infos_end)
    if needed > size:
        raise InputError(f"truncated GGUF: {path} has {size} bytes, its tensors need {needed}")
    for t in tensors:
        if t.offset % alignment:
            raise InputError(f"corrupt GGUF: {path}: tensor {t.name} starts at offset {t.offset}, "
                             f"not a multiple of the alignment {alignment}")
    return GGUFLayout(path, version, metadata, spans, tensors, (infos_start, infos_end), alignment, data_offset, size)


def _alignment(metadata: dict[str, Value], path: Path) -> int:
    """general.alignment as llama.cpp's gguf reader accepts it: a UINT32 power of two (default 32)."""
    value = metadata.get(Keys.General.ALIGNMENT)
    if value is None:
        return DEFAULT_ALIGNMENT
    if value.type != GGUFValueType.UINT32:
        raise InputError(f"corrupt GGUF: {path}: general.alignment is {value.type.name}, llama.cpp requires UINT32")
    alignment = int(value.data)
    if alignment <= 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
        raise InputError(f"corrupt GGUF: {path}: general.alignment {alignment} is not a power of two "
                         f"from 1 to {MAX_ALIGNMENT}")
    return alignment


def _check_tensor_size(info: TensorInfo, path: Path) -> None:
    """Rows of whole blocks, and an element count that fits in int64 (computed in Python ints: no wrapping)."""
    block, _ = GGML_QUANT_SIZES[info.type]
    if info.shape[0] % block:
        raise InputError(f"corrupt GGUF: {path}: tensor {info.name} has rows of {info.shape[0]} elements, "
                         f"not a multiple of {info.type.name}'s block of {block}")
    if math.prod(info.shape) >= 1 << 63:  # ggml counts elements in int64; llama.cpp refuses such shapes
        raise InputError(f"corrupt GGUF: {path}: tensor {info.name} has the shape {list(info.shape)}, "
                         "whose element count overflows 64 bits")


def typed_value(layout: "GGUFLayout", key: str, types: tuple[GGUFValueType, ...], required: bool = False) -> Any:
    """The value of `key` if its GGUF type is one of `types` (None when absent and not required).

    The one way to read a metadata value whose type matters: a wrong type is one clear line, not a
    TypeError deep inside whatever used it.
    """
    value = layout.metadata.get(key)
    if value is None:
        if required:
            raise InputError(f"{layout.path}: metadata key {key} is missing")
        return None
    if value.type not in types:
        names = " or ".join(t.name for t in types)
        raise InputError(f"{layout.path}: metadata key {key} is {value.type.name}, expected {names}")
    return value.python()


def typed_int(layout: "GGUFLayout", key: str, low: int, high: int, required: bool = False) -> int | None:
    """An integer-typed key within [low, high], or None when absent and not required."""
    value = typed_value(layout, key, INTEGER_TYPES, required)
    if value is not None and not low <= value <= high:
        raise InputError(f"{layout.path}: metadata key {key} is {value}, expected {low} to {high}")
    return value


# ---- encoding ---------------------------------------------------------------------------------


def value_from_python(value: Any) -> Value:
    """Infer a GGUF type: str, bool, int (INT64/UINT64 only if needed), float (FLOAT32),
    list[str], or a numpy array (its dtype decides the element type)."""
    if isinstance(value, Value):
        return value
    if isinstance(value, str):
        return Value(GGUFValueType.STRING, value)
    if isinstance(value, bool):
        return Value(GGUFValueType.BOOL, value)
    if isinstance(value, int):
        return Value(GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.INT64, value)
    if isinstance(value, float):
        return Value(GGUFValueType.FLOAT32, value)
    if isinstance(value, np.ndarray):
        dtype = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        sub = _TYPE_OF_DTYPE.get(np.dtype(dtype))
        if sub is None:
            raise TypeError(f"no GGUF array type for dtype {value.dtype}")
        return Value(GGUFValueType.ARRAY, np.ascontiguousarray(value.ravel(), dtype=_SCALAR_DTYPES[sub]), sub)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return Value(GGUFValueType.ARRAY, list(value), GGUFValueType.STRING)
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_kv(key: str, value: Value) -> bytes:
    """One KV record exactly as llama.cpp's gguf reader expects it."""
    out = [_encode_string(key), struct.pack("<I", value.type)]
    if value.type == GGUFValueType.STRING:
        out.append(_encode_string(value.data))
    elif value.type == GGUFValueType.ARRAY:
        assert value.sub_type is not None
        out.append(struct.pack("<IQ", value.sub_type, len(value.data)))
        if value.sub_type == GGUFValueType.STRING:
            out.extend(_encode_string(s) for s in value.data)
        else:
            out.append(np.asarray(value.data, dtype=_SCALAR_DTYPES[value.sub_type]).tobytes())
    else:
        out.append(np.array([value.data], dtype=_SCALAR_DTYPES[value.type]).tobytes())
    return b"".join(out)


def write_with_metadata(
    src: str | Path,
    dst: str | Path,
    new_metadata: dict[str, Any],
    drop_prefixes: tuple[str, ...] = (),
) -> None:
    """Write `dst` = `src` with keys under `drop_prefixes` removed and `new_metadata` added (or replaced).

    Tensor infos and tensor data are copied byte for byte (offsets are relative to the data
    section, so only the padding before it is recomputed). The output appears atomically.
    """
    layout = read_layout(src)
    kept = [k for k in layout.metadata if k not in new_metadata and not k.startswith(drop_prefixes)]
    with open(src, "rb") as fin, atomic_output(Path(dst)) as tmp, open(tmp, "wb") as fout:
        n_kv = len(kept) + len(new_metadata)
        fout.write(GGUF_MAGIC + struct.pack("<IQQ", layout.version, len(layout.tensors), n_kv))
        for key in kept:
            start, end = layout.kv_spans[key]
            fin.seek(start)
            fout.write(fin.read(end - start))
        for key, value in new_metadata.items():
            fout.write(encode_kv(key, value_from_python(value)))
        infos_start, infos_end = layout.tensor_infos_span
        fin.seek(infos_start)
        fout.write(fin.read(infos_end - infos_start))
        pad = (-fout.tell()) % layout.alignment
        fout.write(b"\0" * pad)
        fin.seek(layout.data_offset)
        shutil.copyfileobj(fin, fout, length=16 << 20)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: numpy-order shape (out, in) and its ggml type."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return math.prod(self.shape) // block * size  # Python ints: a product of huge dims cannot wrap


def write_gguf(
    dst: str | Path,
    metadata: dict[str, Any],
    tensors: list[TensorSpec],
    produce: Callable[[TensorSpec], np.ndarray],
    alignment: int = DEFAULT_ALIGNMENT,
) -> None:
    """Write a complete GGUF v3, asking `produce` for each tensor's data in order.

    `produce` returns the tensor's bytes (any array whose `.tobytes()` has exactly `n_bytes`:
    float32/float16 values or quantized uint8 blocks). Only one tensor is held at a time, so
    memory stays flat however deep the model is. The output appears atomically.
    """
    offsets, offset = [], 0
    for spec in tensors:
        offsets.append(offset)
        offset += -(-spec.n_bytes // alignment) * alignment
    if Keys.General.ALIGNMENT in metadata and int(value_from_python(metadata[Keys.General.ALIGNMENT]).data) != alignment:
        raise ValueError("metadata general.alignment differs from the alignment used for writing")
    with atomic_output(Path(dst)) as tmp, open(tmp, "wb") as out:
        out.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
        for key, value in metadata.items():
            out.write(encode_kv(key, value_from_python(value)))
        for spec, off in zip(tensors, offsets):
            ne = tuple(reversed(spec.shape))
            out.write(_encode_string(spec.name) + struct.pack("<I", len(ne)))
            out.write(struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", spec.type, off))
        out.write(b"\0" * ((-out.tell()) % alignment))
        for spec in tensors:
            data = np.ascontiguousarray(produce(spec))  # written from its own buffer: no bytes copy of a tensor
            if data.nbytes != spec.n_bytes:
                raise ValueError(f"{spec.name}: produced {data.nbytes} bytes, expected {spec.n_bytes}")
            out.write(memoryview(data.reshape(-1)).cast("B"))
            out.write(b"\0" * ((-data.nbytes) % alignment))


def copy_metadata(layout: GGUFLayout, drop_prefixes: tuple[str, ...] = ("GGUF.",)) -> dict[str, Value]:
    """The layout's metadata as typed Values, ready for `write_gguf` (keys under drop_prefixes left out)."""
    return {k: v for k, v in layout.metadata.items() if not k.startswith(drop_prefixes)}
