"""Tensor access: raw bytes and dequantized float32 weights of a GGUF, memory-mapped, one at a time.

Shapes: `TensorInfo.shape` is ggml order (ne0 first); arrays returned here are numpy order
(reversed), so a weight is (out, in) and y = W x.
"""

from __future__ import annotations

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
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
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
        data = np.asarray(self._map[start : start + info.n_bytes])  # a plain view: memmap subclass costs ~1 s/pass
        block, size = GGML_QUANT_SIZES[info.type]
        row_bytes = info.shape[0] // block * size
        return data.reshape(-1, row_bytes)

    def dequantize(self, name: str) -> np.ndarray:
        """float32 in numpy order; works for every type gguf-py can dequantize (all llama.cpp types)."""
        info = self.info(name)
        raw = self.raw(name)
        if info.type == GGMLQuantizationType.F32:
            values = raw.view(np.float32)
        else:
            try:
                values = quants.dequantize(raw, info.type)
            except NotImplementedError:
                raise InputError(f"cannot dequantize {name}: tensor type {info.type.name} unsupported") from None
        return np.asarray(values, dtype=np.float32).reshape(self.numpy_shape(name))
