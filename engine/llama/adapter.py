"""theta as a llama.cpp LoRA adapter GGUF: how the star product runs inside llama.cpp's own graph.

llama.cpp computes y = W x + s·(alpha/r)·B(A x) for an adapter with lora_a = A (r, in) and
lora_b = B (out, r), r that tensor's own rank, and y = W x + s·B(A x) when alpha = 0 (`get_scale` in its
adapter code). Every weight may have its own rank, so alpha = 0 is written: with s = γ that is exactly the
star product W x + γ·B·A·x on every weight.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType, Keys

from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import TensorSpec, Value, write_gguf
from nkat_gguf.format.nkat import NkatTheta

UNIT_SCALE_ALPHA = 0.0  # llama.cpp's get_scale: alpha ? s·alpha/rank : s
ADAPTER_TYPES = {"F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16}


def write_lora_adapter(
    dst: str | Path,
    theta: NkatTheta,
    architecture: str,
    scale_folded_into_b: float = 1.0,
    tensor_type: str = "F32",
    name: str = "nkat-theta",
) -> Path:
    """Write theta as a LoRA GGUF. `scale_folded_into_b` = γ for runtimes that apply adapters at scale 1."""
    if tensor_type not in ADAPTER_TYPES:
        raise InputError(f"adapter tensor type must be one of {', '.join(ADAPTER_TYPES)}")
    ggml_type = ADAPTER_TYPES[tensor_type]
    numpy_type = np.float32 if ggml_type == GGMLQuantizationType.F32 else np.float16
    factors = {n: t.dequantize() for n, t in theta.tensors.items()}
    specs, arrays = [], {}
    for n in sorted(factors):
        f = factors[n]
        arrays[n + ".lora_a"] = f.a
        arrays[n + ".lora_b"] = f.b * np.float32(scale_folded_into_b)
        specs += [TensorSpec(n + ".lora_a", f.a.shape, ggml_type), TensorSpec(n + ".lora_b", f.b.shape, ggml_type)]
    metadata = {
        Keys.General.ARCHITECTURE: architecture,
        Keys.General.TYPE: "adapter",
        Keys.General.NAME: name,
        Keys.Adapter.TYPE: "lora",
        # FLOAT32 is required: any other type aborts llama.cpp (see shared facts). 0: unit scale per tensor
        Keys.Adapter.LORA_ALPHA: Value(GGUFValueType.FLOAT32, UNIT_SCALE_ALPHA),
    }
    write_gguf(dst, metadata, specs, lambda s: arrays[s.name].astype(numpy_type))
    return Path(dst)


def cache_root() -> Path:
    """$NKAT_CACHE_DIR, else ~/.cache/nkat-gguf: runtime adapters and calibrations live below it."""
    return Path(os.environ.get("NKAT_CACHE_DIR") or Path.home() / ".cache" / "nkat-gguf")


def adapter_cache_dir() -> Path:
    """$NKAT_CACHE_DIR/adapters, else ~/.cache/nkat-gguf/adapters."""
    return cache_root() / "adapters"


def cached_adapter(theta: NkatTheta, architecture: str, cache_dir: Path | None = None) -> Path:
    """The runtime adapter for theta, written once and keyed by the content of theta."""
    directory = cache_dir or adapter_cache_dir()
    path = directory / f"{theta.digest()[:32]}-{architecture}.lora.gguf"
    if not path.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create adapter cache {directory}: {exc.strerror} (set NKAT_CACHE_DIR)") from None
        write_lora_adapter(path, theta, architecture)
    return path
