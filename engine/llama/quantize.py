"""Quantization with llama.cpp's own quantizer, optionally with an importance matrix: whole files
(`llama_model_quantize`) and single weights (ggml's `ggml_quantize_chunk`, for θ's joint rounds and merges).

Using llama.cpp itself makes the output exactly what `llama-quantize` would write, for every type
(gguf-py can only quantize a few types in numpy).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import llama_cpp
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, Keys
from llama_cpp._ggml import libggml

from nkat_gguf.engine.llama.native_log import captured_llama_log
from nkat_gguf.errors import InputError, NkatError, UnsupportedModelError
from nkat_gguf.format.gguf_file import GGUFLayout, read_layout

_FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"
# llama-quant.cpp's tensor_type_fallback: "warning: NAME - ncols N not divisible by B (required for type T) -> falling back to U"
_FALLBACK = re.compile(r"warning: (\S+)\s+- ncols .*?\(required for type\s*(\S+)\).*?-> falling back to\s*(\S+)")


def outtypes() -> dict[str, int]:
    """Every output type this llama.cpp build can write, by llama-quantize's name (Q4_0, Q4_K_M, ...)."""
    names = {k[len(_FTYPE_PREFIX):]: v for k, v in vars(llama_cpp).items()
             if k.startswith(_FTYPE_PREFIX) and isinstance(v, int)}
    names["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return dict(sorted(names.items(), key=lambda kv: kv[1]))


def resolve_outtype(outtype: str, layout: GGUFLayout) -> tuple[str, int]:
    """(name, llama_ftype) for `--outtype`; "same" means the input's general.file_type."""
    table = outtypes()
    if outtype.lower() == "same":
        ftype = layout.get(Keys.General.FILE_TYPE)
        if ftype is None:
            raise InputError(f"{layout.path.name} has no general.file_type; pass --outtype explicitly")
        by_value = {v: k for k, v in table.items()}
        if isinstance(ftype, bool) or not isinstance(ftype, int) or ftype not in by_value:
            raise InputError(f"{layout.path.name}: general.file_type {ftype!r} is not one llama.cpp can write; "
                             "pass --outtype")
        return by_value[ftype], int(ftype)
    name = outtype.upper()
    if name not in table:
        raise InputError(f"unknown --outtype {outtype!r}; choose one of: same, {', '.join(table)}")
    return name, table[name]


def _imatrix_array(imatrix: dict[str, np.ndarray]) -> tuple[ctypes.Array, list]:
    """NULL-terminated `llama_model_imatrix_data[]`; the list keeps the buffers alive during the call."""
    keep: list = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        data = np.ascontiguousarray(values, dtype=np.float32)
        raw_name = name.encode()
        keep += [data, raw_name]
        entries[i].name = raw_name
        entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = data.size
    return entries, keep


def tensor_pattern(name: str) -> str:
    """The `--tensor-type` pattern that matches exactly one tensor: llama-quant.cpp compiles each pattern as a
    std::regex (ECMAScript) and takes the first that `regex_search` finds anywhere in the name, so an
    unanchored `blk.1.attn_v.weight` would also match `blk.11.attn_v.weight`."""
    return "^" + re.escape(name) + "$"


def _override_array(overrides: dict[str, GGMLQuantizationType]) -> tuple[ctypes.Array, list]:
    """`llama_model_tensor_override[]` ending in a NULL pattern (how llama-quant.cpp finds its end)."""
    keep: list = []
    entries = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (name, ggml_type) in enumerate(sorted(overrides.items())):
        pattern = tensor_pattern(name).encode()
        keep.append(pattern)
        entries[i].pattern = pattern
        entries[i].type = int(ggml_type)
    return entries, keep


def quantize_model(
    src: Path, dst: Path, ftype: int, imatrix: dict[str, np.ndarray] | None = None, threads: int = 0,
    overrides: dict[str, GGMLQuantizationType] | None = None,
) -> str:
    """Quantize `src` to `dst` (llama ftype); returns llama.cpp's log. Raises NkatError on failure.

    `imatrix` maps weight names to the mean of x^2 per input column (llama.cpp's importance matrix).
    `overrides` gives single tensors their own type (`llama-quantize --tensor-type`); llama.cpp still applies
    its row-width fallbacks to them, so give only `accepted_types` and check the result with `check_types`.
    """
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True  # the input may already be quantized (the default model is Q4_1)
    keep: list = []
    if imatrix:
        entries, kept = _imatrix_array(imatrix)
        keep += [entries, kept]
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if overrides:
        table, kept = _override_array(overrides)
        keep += [table, kept]
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    with captured_llama_log() as log:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if status != 0:
        raise NkatError(f"llama.cpp could not quantize {src.name}: {log.reason(f'status {status}')}")
    return log.text


def accepted_types(row_width: int, candidates: tuple[GGMLQuantizationType, ...]) -> list[GGMLQuantizationType]:
    """The candidates llama.cpp's quantizer writes as asked for rows of `row_width` values.

    `tensor_type_fallback` (llama-quant.cpp) replaces any type whose block does not divide the row length
    (K-quants: 256, so SmolLM2's 576-wide rows lose them); every other type is written as asked.
    """
    return [t for t in candidates if row_width % GGML_QUANT_SIZES[t][0] == 0]


def check_types(path: Path, expected: dict[str, GGMLQuantizationType]) -> None:
    """Raise NkatError unless every named tensor of the written file has the type it was given."""
    written = {t.name: t.type for t in read_layout(path).tensors}
    wrong = {n: (t.name, written.get(n)) for n, t in expected.items() if written.get(n) != t}
    if wrong:
        name, (asked, got) = next(iter(sorted(wrong.items())))
        raise NkatError(f"llama.cpp wrote {len(wrong)} tensors of {path.name} at another type than asked, "
                        f"e.g. {name}: {asked} -> {getattr(got, 'name', got)}")


def fallbacks(log: str) -> dict[str, str]:
    """Tensor name -> "q3_K -> q4_0" for each tensor whose rows the requested type cannot hold (from the log).

    K-quants need rows that are a multiple of 256 wide: on a model of width 576 most weights fall back.
    """
    return {name: f"{wanted} -> {used}" for name, wanted, used in _FALLBACK.findall(log)}


def _ggml() -> ctypes.CDLL:
    """llama-cpp-python's own libggml (its private `_ggml` module loads it for every platform)."""
    libggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    libggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    libggml.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    libggml.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return libggml


def quantize_rows(name: str, values: np.ndarray, ggml_type: GGMLQuantizationType,
                  imatrix: np.ndarray | None = None) -> np.ndarray:
    """A float32 (rows, n) weight in `ggml_type`, exactly as llama.cpp quantizes it (with `imatrix`, E[x²] per
    column, as `llama_model_quantize` passes it to ggml for that weight)."""
    if ggml_type == GGMLQuantizationType.F32:
        return values
    lib = _ggml()
    if imatrix is None and lib.ggml_quantize_requires_imatrix(int(ggml_type)):
        raise UnsupportedModelError(f"{name} is {ggml_type.name}, which llama.cpp quantizes only with an importance "
                                    "matrix; choose a merged type with --outtype (e.g. Q4_K_M)")
    rows, n_per_row = values.shape
    block, size = GGML_QUANT_SIZES[ggml_type]
    out = np.empty(rows * (n_per_row // block) * size, dtype=np.uint8)
    src = np.ascontiguousarray(values, dtype=np.float32)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if weights is not None and weights.shape != (n_per_row,):
        raise ValueError(f"importance matrix for {name} has shape {weights.shape}, expected ({n_per_row},)")
    written = lib.ggml_quantize_chunk(int(ggml_type), src.ctypes.data, out.ctypes.data, 0, rows, n_per_row,
                                      None if weights is None else weights.ctypes.data)
    if written != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {name}, expected {out.size}")
    return out
