"""Per-weight ranks in llama.cpp: the runtime adapter and the exported one both give W x + γ·B·A·x.

llama.cpp scales each weight's B·A by alpha/rank when alpha ≠ 0; the adapters are written with alpha = 0,
so weights of rank 1, 2 and 5 side by side (and weights with no theta) must all match merged F32 weights.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType

from nkat_gguf.convert.selection import default_theta_tensors
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.export.exports import export_adapter
from nkat_gguf.format.gguf_file import TensorSpec, copy_metadata, read_layout, write_gguf, write_with_metadata
from nkat_gguf.format.nkat import PREFIX, NkatTheta, theta_metadata
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.theta import LowRank, quantize_int8
from nkat_gguf.texts import builtin_text

GAMMA = 0.8
RANKS = (1, 2, 5, 0)  # cycled over the weights: 0 leaves a weight without theta
N_TOKENS = 64
TOLERANCE = 1e-4  # max |Δlogit|, F32 weights and F32 KV cache; theta itself moves logits far more (checked)


@pytest.fixture(scope="module")
def mixed_rank_model(tiny_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tiny_f32 with theta of mixed ranks, and the same model with W + γ·B·A merged in F32."""
    rng = np.random.default_rng(11)
    source = TensorSource(tiny_f32)
    tensors = {}
    for i, name in enumerate(default_theta_tensors(source.layout)):
        rank = RANKS[i % len(RANKS)]
        if rank:
            out_dim, in_dim = source.numpy_shape(name)
            a = rng.standard_normal((rank, in_dim)).astype(np.float32) / np.float32(np.sqrt(in_dim))
            b = rng.standard_normal((out_dim, rank)).astype(np.float32) * np.float32(0.2)
            tensors[name] = quantize_int8(LowRank(b, a))
    theta = NkatTheta(GAMMA, tensors)
    assert sorted(set(theta.ranks.values())) == [1, 2, 5] and len(tensors) < len(default_theta_tensors(source.layout))
    directory = tmp_path_factory.mktemp("mixed-ranks")
    nkat = directory / "mixed.nkat.gguf"
    write_with_metadata(tiny_f32, nkat, theta_metadata(theta))

    dense = {n: t.dequantize() for n, t in tensors.items()}

    def merged_tensor(spec: TensorSpec) -> np.ndarray:
        w = source.dequantize(spec.name)
        return w + np.float32(GAMMA) * (dense[spec.name].b @ dense[spec.name].a) if spec.name in dense else w

    merged = directory / "merged.gguf"
    specs = [TensorSpec(t.name, tuple(reversed(t.shape)), GGMLQuantizationType.F32) for t in source.layout.tensors]
    write_gguf(merged, copy_metadata(source.layout, ("GGUF.", PREFIX)), specs, merged_tensor)
    return nkat, merged


def logits(llm: llama_cpp.Llama) -> np.ndarray:
    tokens = llm.tokenize(builtin_text("evaluation").content[:4000].encode())[:N_TOKENS]
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:N_TOKENS])


def plain(model: Path, adapter: Path | None = None) -> np.ndarray:
    extra = {"lora_path": str(adapter), "lora_scale": 1.0} if adapter else {}
    llm = llama_cpp.Llama(str(model), n_ctx=128, n_batch=128, n_threads=2, type_k=0, type_v=0, logits_all=True,
                          verbose=False, **extra)
    try:
        return logits(llm)
    finally:
        llm.close()


def test_runtime_adapter_with_mixed_ranks_equals_merged_weights(mixed_rank_model: tuple[Path, Path]) -> None:
    nkat, merged = mixed_rank_model
    options = RuntimeOptions(n_ctx=128, n_batch=128, n_threads=2, f32_kv_cache=True, logits_all=True)
    with NkatRuntime(nkat, options, gamma=GAMMA) as runtime:
        star = logits(runtime.llm)
        runtime.set_gamma(None)
        off = logits(runtime.llm)
    folded = plain(merged)
    assert np.abs(star - folded).max() < TOLERANCE
    assert np.abs(off - folded).max() > 100 * TOLERANCE  # theta visibly matters


def test_exported_adapter_with_mixed_ranks_at_scale_one_equals_merged_weights(
        mixed_rank_model: tuple[Path, Path], tmp_path: Path) -> None:
    """γ folded into B, alpha = 0: Ollama/KoboldCpp (scale 1) get exactly γ·B·A on every weight."""
    nkat, merged = mixed_rank_model
    adapter = tmp_path / "theta.gguf"
    export_adapter(nkat, adapter, tensor_type="F32")
    assert read_layout(adapter).get("adapter.lora.alpha") == 0.0
    assert np.abs(plain(nkat, adapter) - plain(merged)).max() < TOLERANCE
