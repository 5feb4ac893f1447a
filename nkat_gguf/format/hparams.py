"""The model hyperparameters llama.cpp asserts on, checked before a file reaches llama.cpp.

llama.cpp loads a model inside our process, and a failed `GGML_ASSERT` aborts the whole process
(SIGABRT) instead of raising. What it asserts on or divides by is read from the pinned source,
`llama_model_base::load_hparams` (src/llama-model.cpp) and `llama_hparams` (src/llama-hparams.cpp):
block count in 1..LLAMA_MAX_LAYERS, expert counts, head counts (n_head / n_head_kv is a division),
the embedding width (divided by n_head), the rope scaling type. Its typed getters also require the
exact GGUF type (UINT32 for counts, FLOAT32 for rope and norm settings). What this pure check cannot
foresee is caught by loading the file in a child process first (engine/llama/probe.py).
"""

from __future__ import annotations

import math

from gguf.constants import MODEL_ARCH_NAMES, GGUFValueType, Keys

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
    return _uint(layout, Keys.LLM.CONTEXT_LENGTH.format(arch=layout.architecture), 1, MAX_CONTEXT, required=True)


def check_context(layout: GGUFLayout, n_ctx: int, option: str = "--ctx") -> None:
    """Refuse a context beyond the trained one: positions past it are untrained, and the KV cache grows with it."""
    trained = n_ctx_train(layout)
    if n_ctx > trained:
        raise InputError(f"{option} {n_ctx} exceeds {layout.path.name}'s trained context of {trained} tokens")


def check_hparams(layout: GGUFLayout) -> None:
    """Refuse, in one line, a model whose hyperparameters would make llama.cpp abort or divide by zero."""
    if layout.get(Keys.General.TYPE, "model") != "model":
        return  # adapters and imatrix files carry no hyperparameters
    arch = layout.architecture
    if arch not in KNOWN_ARCHITECTURES:
        return  # llama.cpp refuses an unknown architecture itself, in a catchable way
    name = layout.path.name

    def key(template: str) -> str:
        return template.format(arch=arch)

    n_layer = _uint(layout, key(Keys.LLM.BLOCK_COUNT), 1, LLAMA_MAX_LAYERS, required=True)
    n_ctx_train(layout)
    embd_key = key(Keys.LLM.EMBEDDING_LENGTH)
    n_embd = _uint(layout, embd_key, 1, MAX_WIDTH, required=True)
    _per_layer(layout, key(Keys.LLM.FEED_FORWARD_LENGTH), n_layer, 0, MAX_WIDTH)
    n_expert = _uint(layout, key(Keys.LLM.EXPERT_COUNT), 0, LLAMA_MAX_EXPERTS) or 0
    used = _per_layer(layout, key(Keys.LLM.EXPERT_USED_COUNT), n_layer, 0, n_expert) or [0]
    groups = _uint(layout, key(Keys.LLM.EXPERT_GROUP_COUNT), 0, LLAMA_MAX_EXPERTS) or 0
    if n_expert > 0 and (max(used) == 0 or groups >= n_expert):
        raise InputError(f"{name}: {n_expert} experts need {key(Keys.LLM.EXPERT_USED_COUNT)} >= 1 and fewer "
                         "expert groups")
    if n_expert == 0 and groups:
        raise InputError(f"{name}: {key(Keys.LLM.EXPERT_GROUP_COUNT)} {groups} without experts")
    _uint(layout, key(Keys.LLM.NEXTN_PREDICT_LAYERS), 0, n_layer)
    heads_key, kv_key = key(Keys.Attention.HEAD_COUNT), key(Keys.Attention.HEAD_COUNT_KV)
    heads = _per_layer(layout, heads_key, n_layer, 0, MAX_WIDTH)
    heads_kv = _per_layer(layout, kv_key, n_layer, 0, MAX_WIDTH) or heads
    if heads:
        if heads[0] > 0 and typed_value(layout, key(Keys.Attention.KEY_LENGTH), _UINT32) is None \
                and n_embd % heads[0]:
            raise InputError(f"{name}: {embd_key} {n_embd} is not a multiple of {heads_key} {heads[0]}")
        for h, kv in zip(_each_layer(heads, n_layer), _each_layer(heads_kv, n_layer)):
            if h and (kv == 0 or h % kv):
                raise InputError(f"{name}: {heads_key} {h} is not a multiple of {kv_key} {kv}")
    _uint(layout, key(Keys.Attention.KEY_LENGTH), 1, MAX_WIDTH)
    _uint(layout, key(Keys.Attention.VALUE_LENGTH), 1, MAX_WIDTH)
    rot_key = key(Keys.Rope.DIMENSION_COUNT)
    n_rot = _uint(layout, rot_key, 0, MAX_WIDTH)
    if n_rot is not None and n_rot % 2:
        raise InputError(f"{name}: {rot_key} {n_rot} must be even (rope rotates pairs)")
    scaling_key = key(Keys.Rope.SCALING_TYPE)
    scaling = typed_value(layout, scaling_key, (GGUFValueType.STRING,))
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise InputError(f"{name}: {scaling_key} {scaling!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
    for template in (Keys.Rope.FREQ_BASE, Keys.Attention.LAYERNORM_RMS_EPS, Keys.Attention.LAYERNORM_EPS):
        _positive_float(layout, key(template))
    _check_vocab(layout)


def _check_vocab(layout: GGUFLayout) -> None:
    tokens = typed_value(layout, Keys.Tokenizer.LIST, (GGUFValueType.ARRAY,))
    if tokens is None:
        return  # llama.cpp then reports the missing tokenizer itself, without aborting
    if not isinstance(tokens, list) or not tokens:
        raise InputError(f"{layout.path.name}: {Keys.Tokenizer.LIST} must be a non-empty array of strings")
    vocab_key = Keys.LLM.VOCAB_SIZE.format(arch=layout.architecture)
    declared = _uint(layout, vocab_key, 1, 1 << 31)
    if declared is not None and declared != len(tokens):
        raise InputError(f"{layout.path.name}: {vocab_key} {declared} differs from the tokenizer's {len(tokens)} tokens")
    for key in (Keys.Tokenizer.SCORES, Keys.Tokenizer.TOKEN_TYPE):
        value = layout.metadata.get(key)
        if value is not None and (value.type != GGUFValueType.ARRAY or len(value.data) != len(tokens)):
            raise InputError(f"{layout.path.name}: {key} must be an array of {len(tokens)} values, one per token")
