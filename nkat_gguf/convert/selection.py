"""Which weights carry theta: the default set, or `--selective-layers` patterns in any naming scheme."""

from __future__ import annotations

import fnmatch
import re

import gguf
from gguf.constants import GGMLQuantizationType

from nkat_gguf.engine.llama.quantize import accepted_types
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import GGUFLayout

_BLOCK_WEIGHT = re.compile(r"^blk\.\d+\.(attn|ffn)_[a-z_]+\.weight$")


def default_theta_tensors(layout: GGUFLayout) -> list[str]:
    """Every 2-D attention and FFN weight inside a block; never token_embd/output or norms.

    The tied head is the embedding table: an adapter on token_embd loads but aborts at the first
    decode in llama.cpp (see shared facts), so the head is left alone on every model.
    """
    return [t.name for t in layout.tensors
            if len(t.shape) == 2 and _BLOCK_WEIGHT.match(t.name) and "norm" not in t.name]


def _name_map(layout: GGUFLayout) -> gguf.TensorNameMap | None:
    arch = layout.architecture
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        return None
    return gguf.get_tensor_name_map(arch_id, int(layout.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch), 0)))


def select_tensors(layout: GGUFLayout, patterns: list[str] | None) -> list[str]:
    """Resolve patterns (GGUF names, globs like blk.*.ffn_*, or Meta/HF names) to GGUF weight names.

    Only weights of the default set can be selected; a pattern that matches none is an error,
    so a typo never silently converts nothing.
    """
    candidates = default_theta_tensors(layout)
    if not patterns:
        return candidates
    name_map = _name_map(layout)
    chosen: list[str] = []
    for pattern in patterns:
        mapped = name_map.get_name(pattern, try_suffixes=(".weight",)) if name_map else None
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern) or n == mapped]
        if not hits:
            raise InputError(f"--selective-layers {pattern!r} matches no attention/FFN weight of this model")
        chosen += [h for h in hits if h not in chosen]
    return [n for n in candidates if n in chosen]


def resolve_tensor_types(layout: GGUFLayout, tensor_types: tuple[tuple[str, str], ...] | list) -> dict[
        str, GGMLQuantizationType]:
    """`--tensor-type PATTERN=TYPE` pairs as exact weight -> type; the first pattern naming a weight wins (as in
    llama.cpp). A type the quantizer would not write as asked for a weight's row width is refused, not replaced."""
    chosen: dict[str, GGMLQuantizationType] = {}
    widths = {t.name: t.shape[0] for t in layout.tensors}
    for pattern, type_name in tensor_types:
        try:
            ggml_type = GGMLQuantizationType[type_name.upper()]
        except KeyError:
            raise InputError(f"--tensor-type {pattern}={type_name}: unknown type") from None
        for name in select_tensors(layout, [pattern]):
            if not accepted_types(widths[name], (ggml_type,)):
                raise InputError(f"--tensor-type {pattern}={type_name}: {name} has rows of {widths[name]} values, "
                                 f"which {ggml_type.name} cannot hold (llama.cpp would write another type)")
            chosen.setdefault(name, ggml_type)
    return chosen
