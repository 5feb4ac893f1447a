"""Build a llama-architecture GGUF with random weights: tiny ones for tests, large ones for benchmarks.

`build_qwen2_gguf` writes the same shapes as a qwen2 model (llama.cpp's `qwen2` architecture: the
llama tensors plus q/k/v biases, its own metadata prefix), a model no PyTorch forward here covers.

The tokenizer (a real one, so llama.cpp loads and tokenizes) is copied from the embedded default
model; the vocabulary therefore has 49152 entries. No weights are downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType, GGUFValueType

from nkat_gguf.default_model import default_model_path
from nkat_gguf.format.gguf_file import TensorSpec, Value, read_layout, write_gguf


@dataclass(frozen=True)
class LlamaShape:
    d_model: int = 64
    n_ff: int = 128
    n_layers: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    tied_embeddings: bool = True


TINY = LlamaShape()
TINYLLAMA_1B = LlamaShape(d_model=2048, n_ff=5632, n_layers=22, n_head=32, n_head_kv=4)

_NUMPY_QUANTIZABLE = {
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
}


def llama_tensor_specs(shape: LlamaShape, vocab: int, weight_type: GGMLQuantizationType) -> list[TensorSpec]:
    d, ff, hd = shape.d_model, shape.n_ff, shape.d_model // shape.n_head
    kv = hd * shape.n_head_kv
    specs = [TensorSpec("token_embd.weight", (vocab, d), weight_type)]
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        specs += [
            TensorSpec(p + "attn_norm.weight", (d,), GGMLQuantizationType.F32),
            TensorSpec(p + "attn_q.weight", (d, d), weight_type),
            TensorSpec(p + "attn_k.weight", (kv, d), weight_type),
            TensorSpec(p + "attn_v.weight", (kv, d), weight_type),
            TensorSpec(p + "attn_output.weight", (d, d), weight_type),
            TensorSpec(p + "ffn_norm.weight", (d,), GGMLQuantizationType.F32),
            TensorSpec(p + "ffn_gate.weight", (ff, d), weight_type),
            TensorSpec(p + "ffn_up.weight", (ff, d), weight_type),
            TensorSpec(p + "ffn_down.weight", (d, ff), weight_type),
        ]
    specs.append(TensorSpec("output_norm.weight", (d,), GGMLQuantizationType.F32))
    if not shape.tied_embeddings:
        specs.append(TensorSpec("output.weight", (vocab, d), weight_type))
    return specs


def qwen2_tensor_specs(shape: LlamaShape, vocab: int, weight_type: GGMLQuantizationType) -> list[TensorSpec]:
    """llama's tensors plus the F32 q/k/v biases qwen2 models carry (src/models/qwen2.cpp loads them)."""
    kv = shape.d_model // shape.n_head * shape.n_head_kv
    specs = llama_tensor_specs(shape, vocab, weight_type)
    for i in range(shape.n_layers):
        at = specs.index(next(s for s in specs if s.name == f"blk.{i}.attn_output.weight"))
        specs[at:at] = [TensorSpec(f"blk.{i}.attn_{p}.bias", (n,), GGMLQuantizationType.F32)
                        for p, n in (("q", shape.d_model), ("k", kv), ("v", kv))]
    return specs


def build_llama_gguf(
    dst: str | Path,
    shape: LlamaShape = TINY,
    weight_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    seed: int = 0,
) -> Path:
    """Write a random llama GGUF; norms are 1 + small noise, weights N(0, 1/sqrt(fan_in))."""
    return _build(dst, "llama", llama_tensor_specs, shape, weight_type, seed)


def build_qwen2_gguf(
    dst: str | Path,
    shape: LlamaShape = TINY,
    weight_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    seed: int = 0,
) -> Path:
    """Write a random qwen2 GGUF (biases small noise around 0); see `build_llama_gguf`."""
    return _build(dst, "qwen2", qwen2_tensor_specs, shape, weight_type, seed)


def _build(dst: str | Path, arch: str, tensor_specs: Callable[[LlamaShape, int, GGMLQuantizationType], list[TensorSpec]],
           shape: LlamaShape, weight_type: GGMLQuantizationType, seed: int) -> Path:
    if weight_type not in _NUMPY_QUANTIZABLE:
        raise ValueError(f"{weight_type.name} cannot be written without llama.cpp; quantize afterwards")
    source = read_layout(default_model_path())
    vocab = len(source.get("tokenizer.ggml.tokens"))
    metadata: dict[str, object] = {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": f"synthetic-{arch}-d{shape.d_model}-l{shape.n_layers}",
        f"{arch}.block_count": shape.n_layers,
        f"{arch}.context_length": 2048,
        f"{arch}.embedding_length": shape.d_model,
        f"{arch}.feed_forward_length": shape.n_ff,
        f"{arch}.attention.head_count": shape.n_head,
        f"{arch}.attention.head_count_kv": shape.n_head_kv,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.vocab_size": vocab,
        f"{arch}.rope.dimension_count": shape.d_model // shape.n_head,
        "general.file_type": Value(GGUFValueType.UINT32, {GGMLQuantizationType.F32: 0}.get(weight_type, 7)),
    }
    metadata.update({k: v for k, v in source.metadata.items() if k.startswith("tokenizer.")})
    rng = np.random.default_rng(seed)

    def produce(spec: TensorSpec) -> np.ndarray:
        if spec.name.endswith(".bias"):
            return (0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
        if len(spec.shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
        w = (rng.standard_normal(spec.shape, dtype=np.float32) / np.sqrt(spec.shape[1])).astype(np.float32)
        return w if spec.type == GGMLQuantizationType.F32 else quants.quantize(w, spec.type)

    write_gguf(dst, metadata, tensor_specs(shape, vocab, weight_type), produce)
    return Path(dst)
