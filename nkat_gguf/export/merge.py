"""theta merged into the weights: W' = dequant(W_q) + γ·B·A, requantized, for runtimes without adapters.

Two ways to requantize:
- keep (default): every tensor keeps its own type. Weights without theta are copied byte for byte;
  each merged weight is quantized by ggml's own `ggml_quantize_chunk` to the type it had, so the
  output has exactly the input's tensor types (no importance matrix: the file does not carry one).
- `outtype`: an intermediate GGUF (merged weights F32, the rest unchanged) goes through
  llama.cpp's quantizer, whose per-tensor type rules for that file type apply as in `convert`.
Either way the correction is rounded by the quantizer again, which can lose much of it: measure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType

from nkat_gguf.engine.llama.quantize import quantize_model, quantize_rows, resolve_outtype
from nkat_gguf.format import nkat
from nkat_gguf.format.atomic import atomic_output, work_dir
from nkat_gguf.format.gguf_file import TensorSpec, copy_metadata, read_layout, write_gguf
from nkat_gguf.format.nkat import NkatTheta
from nkat_gguf.format.tensors import TensorSource

DROPPED_PREFIXES = ("GGUF.", nkat.PREFIX)  # the merged file carries no theta: applying it again would double it


def write_merged(model: Path, dst: Path, theta: NkatTheta, gamma: float, outtype: str | None = None,
                 threads: int = 0) -> None:
    """Write `dst` = `model` with γ·B·A added to every weight theta covers (see module docstring)."""
    layout = read_layout(model)
    source = TensorSource(model, layout)
    factors = {name: t.dequantize() for name, t in theta.tensors.items()}

    def merged(name: str) -> np.ndarray:
        f = factors[name]
        return source.dequantize(name) + np.float32(gamma) * (f.b @ f.a)

    def produce(quantize: bool) -> Callable[[TensorSpec], np.ndarray]:
        def tensor(spec: TensorSpec) -> np.ndarray:
            if spec.name not in factors:
                return source.raw(spec.name)
            return quantize_rows(spec.name, merged(spec.name), spec.type) if quantize else merged(spec.name)
        return tensor

    metadata = copy_metadata(layout, DROPPED_PREFIXES)
    if outtype is None:
        specs = [TensorSpec(t.name, tuple(reversed(t.shape)), t.type) for t in layout.tensors]
        write_gguf(dst, metadata, specs, produce(quantize=True), layout.alignment)
        return
    _, ftype = resolve_outtype(outtype, layout)
    specs = [TensorSpec(t.name, tuple(reversed(t.shape)), GGMLQuantizationType.F32 if t.name in factors else t.type)
             for t in layout.tensors]
    with work_dir(dst.parent, "merge") as tmp, atomic_output(dst) as quantized:
        intermediate = Path(tmp) / "merged-f32.gguf"
        write_gguf(intermediate, metadata, specs, produce(quantize=False), layout.alignment)
        quantize_model(intermediate, quantized, ftype, threads=threads)
