"""The model hyperparameters llama.cpp asserts on, checked before a file reaches llama.cpp.

llama.cpp loads a model inside our process, and a failed `GGML_ASSERT` aborts the whole process
(SIGABRT) instead of raising. What it asserts on or divides by is read from the pinned source,
`llama_model_base::load_hparams` (src/llama-model.cpp) and `llama_hparams` (src/llama-hparams.cpp):
block count in 1..LLAMA_MAX_LAYERS, expert counts, head counts (n_head / n_head_kv is a division),
the embedding width (divided by n_head), the rope scaling type. Its typed getters also require the
exact GGUF type (UINT32 for counts, FLOAT32 for rope and norm settings). What this pure check cannot
foresee is caught by loading the file in a child process first (engine/probe.py).
"""

from __future__ import annotations

import math

from gguf.constants import MODEL_ARCH_NAMES, GGUFValueType

from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import GGUFLayout, typed_value

LLAMA_MAX_LAYERS = 512  # src/llama-hparams.h
LLAMA_MAX_EXPERTS = 1024
MAX_WIDTH = 1 << 20  # embedding / feed-forward widths: far beyond any model, far below overflow
MAX_CONTEXT = 1 << 24
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama_rope_scaling_type_from_string
KNOWN_ARCHITECTURES = frozenset(MODEL_ARCH_NAMES.values())
_UINT32 = (GGUFValueType.UINT32,)
_FLOAT32 = (GGUFValueType.FLOAT32,)


def _uint(layout: GGUFLayout, key: str, low: int, high: int, required: bool = False) -> int | None:
    value = typed_value(layout, key, _UINT32, required)
    if value is not None and not low <= value <= high:
        raise InputError(f"{layout.path.name}: {key} is {value}; llama.cpp needs {low} to {high}")
    return value


def _per_layer(layout: GGUFLayout, key: str, n_layer: int, low: int, high: int) -> list[int] | None:
    """A count given once or per layer (llama.cpp's get_key_or_arr): UINT32, or an integer array of n_layer."""
    value = layout.metadata.get(key)
    if value is None:
        return None
    if value.type == GGUFValueType.ARRAY:
        if value.sub_type not in (GGUFValueType.UINT32, GGUFValueType.INT32) or len(value.data) != n_layer:
            raise InputError(f"{layout.path.name}: {key} must be UINT32 or an array of {n_layer} integers "
                             f"(one per layer)")
        values = [int(v) for v in value.data]
    else:
        values = [_uint(layout, key, low, high)]
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise InputError(f"{layout.path.name}: {key} is {bad[0]}; llama.cpp needs {low} to {high}")
    return values


def _each_layer(values: list[int], n_layer: int) -> list[int]:
    return values * n_layer if len(values) == 1 else values


def _positive_float(layout: GGUFLayout, key: str) -> None:
    value = typed_value(layout, key, _FLOAT32)
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"{layout.path.name}: {key} is {value}; it must be a finite number > 0")


def n_ctx_train(layout: GGUFLayout) -> int:
    """The context length the model was trained with (`<arch>.context_length`), checked."""
    return _uint(layout, f"{layout.architecture}.context_length", 1, MAX_CONTEXT, required=True)


def check_context(layout: GGUFLayout, n_ctx: int, option: str = "--ctx") -> None:
    """Refuse a context beyond the trained one: positions past it are untrained, and the KV cache grows with it."""
    trained = n_ctx_train(layout)
    if n_ctx > trained:
        raise InputError(f"{option} {n_ctx} exceeds {layout.path.name}'s trained context of {trained} tokens")


def check_hparams(layout: GGUFLayout) -> None:
    """Refuse, in one line, a model whose hyperparameters would make llama.cpp abort or divide by zero."""
    if layout.get("general.type", "model") != "model":
        return  # adapters and imatrix files carry no hyperparameters
    arch = layout.architecture
    if arch not in KNOWN_ARCHITECTURES:
        return  # llama.cpp refuses an unknown architecture itself, in a catchable way
    name = layout.path.name
    n_layer = _uint(layout, f"{arch}.block_count", 1, LLAMA_MAX_LAYERS, required=True)
    n_ctx_train(layout)
    n_embd = _uint(layout, f"{arch}.embedding_length", 1, MAX_WIDTH, required=True)
    _per_layer(layout, f"{arch}.feed_forward_length", n_layer, 0, MAX_WIDTH)
    n_expert = _uint(layout, f"{arch}.expert_count", 0, LLAMA_MAX_EXPERTS) or 0
    used = _per_layer(layout, f"{arch}.expert_used_count", n_layer, 0, n_expert) or [0]
    groups = _uint(layout, f"{arch}.expert_group_count", 0, LLAMA_MAX_EXPERTS) or 0
    if n_expert > 0 and (max(used) == 0 or groups >= n_expert):
        raise InputError(f"{name}: {n_expert} experts need {arch}.expert_used_count >= 1 and fewer expert groups")
    if n_expert == 0 and groups:
        raise InputError(f"{name}: {arch}.expert_group_count {groups} without experts")
    _uint(layout, f"{arch}.nextn_predict_layers", 0, n_layer)
    heads = _per_layer(layout, f"{arch}.attention.head_count", n_layer, 0, MAX_WIDTH)
    heads_kv = _per_layer(layout, f"{arch}.attention.head_count_kv", n_layer, 0, MAX_WIDTH) or heads
    if heads:
        if heads[0] > 0 and typed_value(layout, f"{arch}.attention.key_length", _UINT32) is None \
                and n_embd % heads[0]:
            raise InputError(f"{name}: {arch}.embedding_length {n_embd} is not a multiple of "
                             f"{arch}.attention.head_count {heads[0]}")
        for h, kv in zip(_each_layer(heads, n_layer), _each_layer(heads_kv, n_layer)):
            if h and (kv == 0 or h % kv):
                raise InputError(f"{name}: {arch}.attention.head_count {h} is not a multiple of "
                                 f"{arch}.attention.head_count_kv {kv}")
    _uint(layout, f"{arch}.attention.key_length", 1, MAX_WIDTH)
    _uint(layout, f"{arch}.attention.value_length", 1, MAX_WIDTH)
    n_rot = _uint(layout, f"{arch}.rope.dimension_count", 0, MAX_WIDTH)
    if n_rot is not None and n_rot % 2:
        raise InputError(f"{name}: {arch}.rope.dimension_count {n_rot} must be even (rope rotates pairs)")
    scaling = typed_value(layout, f"{arch}.rope.scaling.type", (GGUFValueType.STRING,))
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise InputError(f"{name}: {arch}.rope.scaling.type {scaling!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
    for key in ("rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        _positive_float(layout, f"{arch}.{key}")
    _check_vocab(layout)


def _check_vocab(layout: GGUFLayout) -> None:
    tokens = typed_value(layout, "tokenizer.ggml.tokens", (GGUFValueType.ARRAY,))
    if tokens is None:
        return  # llama.cpp then reports the missing tokenizer itself, without aborting
    if not isinstance(tokens, list) or not tokens:
        raise InputError(f"{layout.path.name}: tokenizer.ggml.tokens must be a non-empty array of strings")
    declared = _uint(layout, f"{layout.architecture}.vocab_size", 1, 1 << 31)
    if declared is not None and declared != len(tokens):
        raise InputError(f"{layout.path.name}: {layout.architecture}.vocab_size {declared} differs from the "
                         f"tokenizer's {len(tokens)} tokens")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        value = layout.metadata.get(key)
        if value is not None and (value.type != GGUFValueType.ARRAY or len(value.data) != len(tokens)):
            raise InputError(f"{layout.path.name}: {key} must be an array of {len(tokens)} values, one per token")
