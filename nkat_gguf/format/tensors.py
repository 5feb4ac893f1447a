"""Tensor access: raw bytes and dequantized float32 weights of a GGUF, memory-mapped, one at a time.

`dequantize` returns a copy and hands the tensor's mapped pages back to the kernel (madvise DONTNEED): a
mapped page read once stays resident otherwise, so a pass over every weight would hold the whole file in the
process's memory at its end. The pages stay in the page cache; a second read costs no disk.

Shapes: `TensorInfo.shape` is ggml order (ne0 first); arrays returned here are numpy order
(reversed), so a weight is (out, in) and y = W x.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import GGUFLayout, TensorInfo, read_layout


class TensorSource:
    """One GGUF opened for reading tensors; nothing is loaded until asked for."""

    def __init__(self, path: str | Path, layout: GGUFLayout | None = None):
        self.layout = layout or read_layout(path)
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if self.layout.file_size else None
        self._map = np.frombuffer(self._mmap, dtype=np.uint8) if self._mmap is not None else np.empty(0, np.uint8)
        self.infos: dict[str, TensorInfo] = {t.name: t for t in self.layout.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise InputError(f"{self.path.name} has no tensor {name}") from None

    def numpy_shape(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self.info(name).shape))

    def raw(self, name: str) -> np.ndarray:
        """Bytes of a quantized tensor as (rows, bytes_per_row), or the typed array for F32/F16/..."""
        info = self.info(name)
        start = self.layout.data_offset + info.offset
        data = self._map[start : start + info.n_bytes]
        block, size = GGML_QUANT_SIZES[info.type]
        row_bytes = info.shape[0] // block * size
        return data.reshape(-1, row_bytes)

    def dequantize(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """float32 in numpy order (a copy; `rows`: of a 2-D weight, only those rows); works for every type
        gguf-py can dequantize (all llama.cpp types)."""
        info = self.info(name)
        raw = self.raw(name)[rows]
        if info.type == GGMLQuantizationType.F32:
            values = raw.view(np.float32).copy()
        else:
            try:
                values = quants.dequantize(raw, info.type)
            except NotImplementedError:
                raise InputError(f"cannot dequantize {name}: tensor type {info.type.name} unsupported") from None
        self.release(name)
        shape = self.numpy_shape(name)
        return np.asarray(values, dtype=np.float32).reshape((-1, *shape[1:]) if rows != slice(None) else shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident memory (they stay in the page cache)."""
        info = self.info(name)
        start = self.layout.data_offset + info.offset
        aligned = start - start % mmap.PAGESIZE
        if self._mmap is not None and info.n_bytes:
            self._mmap.madvise(mmap.MADV_DONTNEED, aligned, start + info.n_bytes - aligned)
