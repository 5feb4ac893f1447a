"""ggml's tensor struct as ctypes, for reading graph nodes in llama.cpp's eval callback.

llama-cpp-python does not wrap `struct ggml_tensor`, so its layout is copied here from the ggml.h
vendored with the pinned llama-cpp-python (0.3.36: vendor/llama.cpp/ggml/include/ggml.h). Another
llama.cpp may move a field; `check_layout()` builds a tensor with ggml's own functions and reads it
back through this struct, so a mismatch is one clear error instead of garbage statistics.
"""

from __future__ import annotations

import ctypes
from functools import cache

import llama_cpp
from llama_cpp._ggml import libggml

from nkat_gguf.errors import NkatError

PINNED_LLAMA_CPP_PYTHON = "0.3.36"

GGML_MAX_DIMS = 4
GGML_MAX_OP_PARAMS = 64
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_OBJECT_SIZE = 32  # struct ggml_object (ggml.c): offs, size, next, type, padding[4]

GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26
GGML_OP_MUL_MAT = 29
GGML_OP_MUL_MAT_ID = 30


class GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),  # elements per dimension, ne[0] the fastest
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),  # stride in bytes per dimension
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@cache
def ggml_lib() -> ctypes.CDLL:
    """libggml of the installed llama-cpp-python, with the signatures used here."""
    lib = libggml
    signatures = {
        "ggml_tensor_overhead": ([], ctypes.c_size_t),
        "ggml_op_name": ([ctypes.c_int], ctypes.c_char_p),
        "ggml_init": ([_InitParams], ctypes.c_void_p),
        "ggml_free": ([ctypes.c_void_p], None),
        "ggml_new_tensor_3d": ([ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64],
                               ctypes.c_void_p),
        "ggml_set_name": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
        "ggml_get_name": ([ctypes.c_void_p], ctypes.c_void_p),
        "ggml_nbytes": ([ctypes.c_void_p], ctypes.c_size_t),
        "ggml_backend_buffer_is_host": ([ctypes.c_void_p], ctypes.c_bool),
        "ggml_backend_tensor_get": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def tensor_name(t: GgmlTensor) -> str:
    """The weight a node refers to: llama-imatrix's filter turns "CUDA0#blk.0.attn_k.weight#0" into the name."""
    name = t.name.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


@cache
def check_layout() -> None:
    """Raise NkatError unless GgmlTensor matches the loaded libggml; checked once per process."""
    problems = layout_problems(GgmlTensor)
    if problems:
        raise NkatError(f"llama-cpp-python {llama_cpp.__version__}'s ggml_tensor does not match the layout of "
                        f"{PINNED_LLAMA_CPP_PYTHON} that calibration reads ({problems[0]}); "
                        f"install llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}")


def layout_problems(struct: type[ctypes.Structure]) -> list[str]:
    """What differs between `struct` and libggml's ggml_tensor: size, op numbers, and the fields of a
    (5, 3, 2) F32 tensor named "probe" built by ggml itself and read back through `struct`."""
    lib = ggml_lib()
    size = lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE
    if size != ctypes.sizeof(struct):
        return [f"sizeof(ggml_tensor) is {size}, expected {ctypes.sizeof(struct)}"]
    problems = [f"op {op} is {lib.ggml_op_name(op)!r}, expected {name!r}"
                for op, name in ((GGML_OP_MUL_MAT, b"MUL_MAT"), (GGML_OP_MUL_MAT_ID, b"MUL_MAT_ID"))
                if lib.ggml_op_name(op) != name]
    ctx = lib.ggml_init(_InitParams(1 << 16, None, False))
    try:
        ptr = lib.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 5, 3, 2)
        lib.ggml_set_name(ptr, b"probe")
        t = struct.from_address(ptr)
        checks = {
            "type": (t.type, GGML_TYPE_F32),
            "ne": (list(t.ne), [5, 3, 2, 1]),
            "nb": (list(t.nb), [4, 20, 60, 120]),
            "name": (t.name, b"probe"),
            "name offset": (lib.ggml_get_name(ptr) - ptr, struct.name.offset),
            "data": (t.data is not None and lib.ggml_nbytes(ptr) == 120, True),
            "src": (list(t.src), [None] * GGML_MAX_SRC),
        }
    finally:
        lib.ggml_free(ctx)
    return problems + [f"{field} reads {got}, expected {want}" for field, (got, want) in checks.items() if got != want]
