"""Read llama.cpp importance-matrix files (`llama-imatrix` output) for `convert --imatrix FILE`.

Users who already have an imatrix for their model can bring it instead of our calibration. Two
layouts exist (llama.cpp tools/imatrix/imatrix.cpp writes them, common/imatrix-loader.cpp reads them):

- GGUF, the current default: `general.type = "imatrix"`; per weight two F32 tensors,
  `<name>.in_sum2` with ne = (n_in, n_mat), raw sums of x^2, and `<name>.counts` with ne = (1, n_mat),
  tokens seen per matrix (n_mat > 1 only for MoE expert stacks). mean = sum / count per matrix; a
  matrix never seen (count 0) gets all ones, as llama-quantize does.
- legacy .dat: int32 n_entries, then per entry int32 name length, the name, int32 ncall, int32 nval
  and nval float32 values = mean * ncall; an optional trailer (chunk count, dataset name) follows.
  mean = values / ncall, or the values as they are when ncall is 0 (llama-quantize again).

Either way the result is what llama-quantize passes to `llama_model_quantize`: per weight, the mean
of x^2 per input column, ne0 * ne2 values. `write_imatrix_file` writes the GGUF layout, with the
metadata llama-imatrix writes (`imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType, Keys

from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import GGUF_MAGIC, GGUFLayout, TensorSpec, Value, read_layout, write_gguf
from nkat_gguf.format.tensors import TensorSource

SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
# llama-imatrix records only matrix multiplications by blk.* weights and output.weight, never the
# embedding lookup (a tied head multiplies token_embd.weight, but it is not recorded either).
NEVER_RECORDED = frozenset({"token_embd.weight"})
F32 = GGMLQuantizationType.F32


def input_widths(layout: GGUFLayout) -> dict[str, int]:
    """Every weight llama.cpp may quantize with an importance matrix, and the length it expects (ne0 * ne2)."""
    return {t.name: t.shape[0] * (t.shape[2] if len(t.shape) > 2 else 1) for t in layout.tensors if len(t.shape) >= 2}


def read_imatrix_file(path: Path, widths: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Weight name -> mean of x^2 per input column, checked against the model's `input_widths`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such imatrix file: {path}")
    with open(path, "rb") as fh:
        is_gguf = fh.read(4) == GGUF_MAGIC
    means = _read_gguf(path) if is_gguf else _read_legacy(path)
    _check(path, means, widths)
    return means


def write_imatrix_file(path: Path, sums: Mapping[str, np.ndarray], counts: Mapping[str, np.ndarray],
                       datasets: list[str], chunk_count: int, chunk_size: int) -> Path:
    """llama-imatrix's GGUF: per weight `<name>.in_sum2` (n_mat, n_in) and `<name>.counts` (n_mat, 1), F32.

    `sums[name]` holds the raw sums of x^2 (n_mat, n_in), `counts[name]` the rows seen per matrix.
    """
    specs, arrays = [], {}
    for name in sorted(sums):
        total, seen = np.asarray(sums[name], dtype=np.float32), np.asarray(counts[name], dtype=np.float32)
        arrays[name + SUMS_SUFFIX], arrays[name + COUNTS_SUFFIX] = total, seen.reshape(-1, 1)
        specs += [TensorSpec(name + SUMS_SUFFIX, total.shape, F32), TensorSpec(name + COUNTS_SUFFIX, (seen.size, 1), F32)]
    metadata = {
        Keys.General.TYPE: "imatrix",
        Keys.IMatrix.DATASETS: Value(GGUFValueType.ARRAY, list(datasets), GGUFValueType.STRING),
        Keys.IMatrix.CHUNK_COUNT: Value(GGUFValueType.UINT32, chunk_count),
        Keys.IMatrix.CHUNK_SIZE: Value(GGUFValueType.UINT32, chunk_size),
    }
    write_gguf(path, metadata, specs, lambda spec: arrays[spec.name])
    return Path(path)


def missing_note(path: Path, means: Mapping[str, np.ndarray], widths: Mapping[str, int]) -> str | None:
    """A note for weights the file does not cover: llama.cpp quantizes them without one, so it is no error."""
    expected = [name for name in widths if name not in NEVER_RECORDED]
    missing = [name for name in expected if name not in means]
    if not missing:
        return None
    return (f"imatrix {Path(path).name} has no entry for {len(missing)} of {len(expected)} weights "
            f"(e.g. {missing[0]}); llama.cpp quantizes those without an importance matrix")


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    layout = read_layout(path)
    kind = layout.get(Keys.General.TYPE)
    if kind != "imatrix":
        raise InputError(f"not an imatrix file: {path.name} is a GGUF with general.type {kind!r}, expected 'imatrix'")
    source = TensorSource(path, layout)
    names = {t.name for t in layout.tensors}
    means = {}
    for tensor in layout.tensors:
        if not tensor.name.endswith(SUMS_SUFFIX):
            continue
        name = tensor.name[: -len(SUMS_SUFFIX)]
        counts_name = name + COUNTS_SUFFIX
        if counts_name not in names:
            raise InputError(f"imatrix {path.name}: {tensor.name} has no matching {counts_name}")
        for t in (tensor, source.info(counts_name)):
            if t.type != GGMLQuantizationType.F32:
                raise InputError(f"imatrix {path.name}: {t.name} is {t.type.name}, llama.cpp requires F32")
            if 0 in t.shape:
                raise InputError(f"imatrix {path.name}: {t.name} has the shape {list(t.shape)}, with no values")
        sums = source.dequantize(tensor.name).reshape(-1, tensor.shape[0])  # (n_mat, n_in)
        counts = source.dequantize(counts_name).reshape(-1)  # (n_mat,)
        if counts.size != sums.shape[0]:
            raise InputError(f"imatrix {path.name}: {name} has {sums.shape[0]} matrices but {counts.size} counts")
        _check_values(path, counts_name, counts)
        seen = counts[:, None] > 0
        means[name] = np.where(seen, sums / np.where(seen, counts[:, None], 1), 1).astype(np.float32).reshape(-1)
    orphans = sorted(n for n in names if n.endswith(COUNTS_SUFFIX) and n[: -len(COUNTS_SUFFIX)] not in means)
    if orphans:
        raise InputError(f"imatrix {path.name}: {orphans[0]} has no matching {SUMS_SUFFIX} tensor")
    if not means:
        raise InputError(f"imatrix {path.name} has no {SUMS_SUFFIX} tensors: nothing to quantize with")
    return means


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise InputError(f"not an imatrix file: {path.name} is neither GGUF nor llama.cpp's legacy .dat "
                             f"layout ({what} at byte {pos} runs past the end of the file)")
        pos += n
        return data[pos - n : pos]

    def int32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = int32("entry count")
    if not 0 < n_entries <= len(data) // 16:  # an entry takes at least 16 bytes
        raise InputError(f"not an imatrix file: {path.name} is neither GGUF nor llama.cpp's legacy .dat "
                         f"layout (entry count {n_entries} for {len(data)} bytes)")
    means = {}
    for i in range(n_entries):
        raw_name = take(int32(f"entry {i + 1} name length"), f"entry {i + 1} name")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"not an imatrix file: {path.name} (entry {i + 1} name is not UTF-8)") from None
        ncall = int32(f"{name} call count")
        nval = int32(f"{name} value count")
        if ncall < 0 or nval < 1:
            raise InputError(f"imatrix {path.name}: {name} has ncall {ncall} and {nval} values")
        values = np.frombuffer(take(4 * nval, f"{name} values"), dtype="<f4").astype(np.float32)
        means[name] = values / np.float32(ncall) if ncall > 0 else values
    return means  # the optional trailer (chunk count, dataset name) says nothing about the values


def _check(path: Path, means: Mapping[str, np.ndarray], widths: Mapping[str, int]) -> None:
    unknown = sorted(n for n in means if n not in widths)
    if unknown:
        raise InputError(f"imatrix {path.name} has {len(unknown)} entries that are not weights of this model "
                         f"(e.g. {unknown[0]}); was it made for another model?")
    for name, values in means.items():
        if values.size != widths[name]:
            raise InputError(f"imatrix {path.name}: {name} has {values.size} values but the weight's input width "
                             f"is {widths[name]}; was it made for another model?")
        _check_values(path, name, values)


def _check_values(path: Path, name: str, values: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        raise InputError(f"imatrix {path.name}: {name} has an invalid value {values[bad[0]]} at index {bad[0]} "
                         f"(mean squares must be finite and >= 0)")
