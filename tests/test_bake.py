"""Baking SO(8) rotations: stock llama.cpp computes the same logits before and after, memory stays
flat with depth, and every bad trained-gate checkpoint is refused with one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType, GGUFValueType
from safetensors.numpy import save_file

from nkat_gguf.default_model import default_model_path
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import TensorSpec, Value, copy_metadata, read_layout, write_gguf
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.so8t.bake import BakePlan, bake_rotations, make_plan
from nkat_gguf.so8t.rotations import random_blocks
from nkat_gguf.texts import builtin_text
from tools.synthetic_model import TINY, LlamaShape, build_llama_gguf

MAX_MEAN_KL = 1e-6  # the gates for function-preserving modes
MAX_ABS_DZ = 1e-3
N_TOKENS = 64
TEXT = builtin_text("calibration").content[:4000]


def logits(path: Path) -> np.ndarray:
    """llama.cpp logits for the first N_TOKENS of the text; F32 KV cache so rounding stays ~1e-5."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, type_k=0, type_v=0,
                          verbose=False, n_threads=2)
    try:
        tokens = llm.tokenize(TEXT.encode(), add_bos=False)[:N_TOKENS]
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def divergence(z_pre: np.ndarray, z_post: np.ndarray) -> tuple[float, float]:
    """(max |z_pre − z_post|, mean over positions of KL(p_pre ‖ p_post))."""
    lp_pre = torch.log_softmax(torch.from_numpy(z_pre), -1)
    lp_post = torch.log_softmax(torch.from_numpy(z_post), -1)
    kl = (lp_pre.exp() * (lp_pre - lp_post)).sum(-1)
    return float(np.abs(z_pre - z_post).max()), float(kl.mean())


def bake(src: Path, dst: Path, plan_of: str | BakePlan, seed: int | None = None, heads: bool = False) -> Path:
    source = TensorSource(src)
    plan = plan_of if isinstance(plan_of, BakePlan) else make_plan(plan_of, source, seed, heads)
    baked = bake_rotations(source, plan)
    write_gguf(dst, baked.metadata, baked.specs, baked.produce)
    return dst


def assert_same_function(z_pre: np.ndarray, post: Path) -> None:
    max_dz, mean_kl = divergence(z_pre, logits(post))
    assert max_dz <= MAX_ABS_DZ and mean_kl <= MAX_MEAN_KL, f"max |Δz| {max_dz:.3g}, mean KL {mean_kl:.3g}"


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A tiny tied GQA model (4 query heads, 2 KV heads, head_dim 16) and its logits."""
    path = build_llama_gguf(tmp_path_factory.mktemp("tied") / "pre.gguf", TINY, seed=1)
    return path, logits(path)


# ---- function-preserving residual and head rotations ------------------------------------------


@pytest.mark.parametrize("mode,seed", [("hadamard", None), ("hadamard", 7), ("random", 3)])
def test_residual_rotation_keeps_the_function(tied, tmp_path, mode, seed):
    pre, z_pre = tied
    post = bake(pre, tmp_path / "post.gguf", mode, seed)
    assert_same_function(z_pre, post)
    before, after = TensorSource(pre), TensorSource(post)
    assert not np.allclose(before.dequantize("token_embd.weight"), after.dequantize("token_embd.weight"), atol=1e-3)
    layout = after.layout
    assert layout.get("nkat.so8t.mode") == mode
    assert layout.get("nkat.so8t.seed") == seed
    assert layout.get("nkat.so8t.max_orthogonality_error") < 1e-12
    assert layout.get("nkat.so8t.min_det") == pytest.approx(1.0, abs=1e-6)


def test_tied_model_gets_its_own_head(tied, tmp_path):
    pre, _ = tied
    post = bake(pre, tmp_path / "post.gguf", "hadamard")
    before, after = TensorSource(pre), TensorSource(post)
    assert "output.weight" not in before and "output.weight" in after
    assert set(after.infos) == set(before.infos) | {"output.weight"}
    assert after.info("output.weight").type == GGMLQuantizationType.F32
    assert not np.allclose(after.dequantize("output.weight"), after.dequantize("token_embd.weight"), atol=1e-3)
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.1.ffn_norm.weight"):
        np.testing.assert_array_equal(after.dequantize(name), 1.0)
    assert after.layout.get("general.file_type") == 0


def test_untied_model_keeps_its_tensor_set(tmp_path):
    pre = build_llama_gguf(tmp_path / "pre.gguf", dataclasses.replace(TINY, tied_embeddings=False), seed=2)
    post = bake(pre, tmp_path / "post.gguf", "random", seed=11)
    assert [t.name for t in read_layout(post).tensors] == [t.name for t in read_layout(pre).tensors]
    assert_same_function(logits(pre), post)


def test_head_rotation_with_gqa(tied, tmp_path):
    pre, z_pre = tied
    with_heads = bake(pre, tmp_path / "heads.gguf", "random", seed=5, heads=True)
    assert_same_function(z_pre, with_heads)
    a, b = TensorSource(with_heads), TensorSource(bake(pre, tmp_path / "plain.gguf", "random", seed=5))
    for name in ("blk.0.attn_v.weight", "blk.1.attn_output.weight"):
        assert not np.allclose(a.dequantize(name), b.dequantize(name), atol=1e-3), name
    np.testing.assert_array_equal(a.dequantize("blk.0.attn_q.weight"), b.dequantize("blk.0.attn_q.weight"))
    assert a.layout.get("nkat.so8t.heads") is True


def test_broken_rotation_breaks_the_function(tied, tmp_path):
    """The comparison can fail: blocks a little off orthogonal change the logits far beyond the gates."""
    pre, z_pre = tied
    plan = make_plan("random", TensorSource(pre), seed=3)
    noise = 0.02 * np.random.default_rng(0).standard_normal(plan.residual.shape)
    post = bake(pre, tmp_path / "post.gguf", dataclasses.replace(plan, residual=plan.residual + noise))
    max_dz, mean_kl = divergence(z_pre, logits(post))
    assert max_dz > 10 * MAX_ABS_DZ and mean_kl > MAX_MEAN_KL
    assert read_layout(post).get("nkat.so8t.max_orthogonality_error") > 1e-2


def test_widths_must_be_multiples_of_8(tmp_path):
    odd = TensorSource(build_llama_gguf(tmp_path / "d60.gguf", LlamaShape(d_model=60, n_head=4, n_head_kv=2)))
    with pytest.raises(InputError, match="d_model 60 is not a positive multiple of 8"):
        make_plan("hadamard", odd)
    head12 = TensorSource(build_llama_gguf(tmp_path / "d48.gguf", LlamaShape(d_model=48, n_head=4, n_head_kv=2)))
    make_plan("hadamard", head12)  # d_model 48 is fine without head rotations
    with pytest.raises(InputError, match="value head_dim 12 is not a positive multiple of 8"):
        make_plan("hadamard", head12, heads=True)


def test_unknown_mode_and_heads_with_gates_are_refused(tied, tmp_path):
    source = TensorSource(tied[0])
    with pytest.raises(InputError, match="unknown SO8T mode 'rotate'"):
        make_plan("rotate", source)
    with pytest.raises(InputError, match="head rotations"):
        make_plan(f"file:{tmp_path / 'g.safetensors'}", source, heads=True)
    with pytest.raises(InputError, match="seed must be >= 0"):
        make_plan("random", source, seed=-1)


# ---- trained gates from a safetensors checkpoint ----------------------------------------------


def expm_skew(generators: np.ndarray) -> np.ndarray:
    """exp(A) per block through the Hermitian eigendecomposition of iA (independent of torch)."""
    lam, u = np.linalg.eigh(1j * generators)
    return np.real(u @ (np.exp(-1j * lam)[..., None] * np.conj(np.swapaxes(u, -1, -2))))


def block_diagonal(blocks: np.ndarray) -> np.ndarray:
    n = 8 * len(blocks)
    out = np.zeros((n, n))
    for k, block in enumerate(blocks):
        out[8 * k : 8 * k + 8, 8 * k : 8 * k + 8] = block
    return out


def skew(m: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal((m, 8, 8)).astype(np.float32)
    return (g - g.transpose(0, 2, 1)) / 2


def test_trained_gates_round_trip(tied, tmp_path):
    """Baked W·R in llama.cpp equals the model whose gated weights were multiplied by R in numpy."""
    pre, z_pre = tied
    alpha = np.float32(0.4)
    rotation = expm_skew(skew(16, 2).astype(np.float64)).astype(np.float32)
    checkpoint = {
        "blk.0.attn_q.weight.so8t_generator": skew(8, 0),
        "blk.1.attn_output.weight.so8t_generator": skew(8, 1),
        "blk.1.attn_output.weight.so8t_alpha": np.array(alpha),
        "blk.1.ffn_down.weight.so8t_rotation": rotation,
    }
    save_file(checkpoint, tmp_path / "gates.safetensors")
    sigmoid = 1 / (1 + np.exp(-np.float64(alpha)))
    expected_r = {
        "blk.0.attn_q.weight": expm_skew(skew(8, 0).astype(np.float64)),
        "blk.1.attn_output.weight": expm_skew(sigmoid * skew(8, 1).astype(np.float64)),
        "blk.1.ffn_down.weight": rotation.astype(np.float64),
    }
    source = TensorSource(pre)

    def gated_by_hand(spec: TensorSpec) -> np.ndarray:
        if spec.name not in expected_r:
            return source.raw(spec.name)
        w = source.dequantize(spec.name).astype(np.float64)
        return (w @ block_diagonal(expected_r[spec.name])).astype(np.float32)

    specs = [TensorSpec(t.name, source.numpy_shape(t.name), t.type) for t in source.layout.tensors]
    by_hand = tmp_path / "by_hand.gguf"
    write_gguf(by_hand, copy_metadata(source.layout), specs, gated_by_hand)
    post = bake(pre, tmp_path / "post.gguf", f"file:{tmp_path / 'gates.safetensors'}")

    baked, reference = TensorSource(post), TensorSource(by_hand)
    for name in expected_r:
        np.testing.assert_allclose(baked.dequantize(name), reference.dequantize(name), atol=1e-6)
    assert divergence(z_pre, logits(by_hand))[0] > 100 * MAX_ABS_DZ  # the gates do change the model
    assert_same_function(logits(by_hand), post)
    assert baked.layout.get("nkat.so8t.mode") == "file"
    assert baked.layout.get("nkat.so8t.checkpoint") == "gates.safetensors"
    assert baked.layout.get("nkat.so8t.max_orthogonality_error") < 1e-5


def test_gates_leave_other_tensors_byte_identical(tmp_path):
    pre = build_llama_gguf(tmp_path / "q8.gguf", TINY, GGMLQuantizationType.Q8_0, seed=3)
    save_file({"blk.0.ffn_up.weight.so8t_generator": skew(8, 4)}, tmp_path / "g.safetensors")
    post = bake(pre, tmp_path / "post.gguf", f"file:{tmp_path / 'g.safetensors'}")
    before, after = TensorSource(pre), TensorSource(post)
    assert [t.name for t in after.layout.tensors] == [t.name for t in before.layout.tensors]
    for info in before.layout.tensors:
        if info.name == "blk.0.ffn_up.weight":
            assert after.info(info.name).type == GGMLQuantizationType.F32
        else:
            assert after.info(info.name).type == info.type
            np.testing.assert_array_equal(after.raw(info.name), before.raw(info.name))
    assert after.layout.get("general.file_type") == before.layout.get("general.file_type")


def _rotations(m: int) -> np.ndarray:
    return random_blocks(8 * m, seed=9).astype(np.float32)


def _scaled_block(blocks: np.ndarray, k: int, factor: float) -> np.ndarray:
    out = blocks.copy()
    out[k] *= factor
    return out


def _reflected_block(blocks: np.ndarray, k: int) -> np.ndarray:
    out = blocks.copy()
    out[k, 0] *= -1
    return out


def _with(arr: np.ndarray, k: int, i: int, j: int, value: float) -> np.ndarray:
    out = arr.copy()
    out[k, i, j] = value
    return out


Q = "blk.0.attn_q.weight"  # input width 64: 8 blocks
BAD_CHECKPOINTS = {
    "not orthogonal": ({f"{Q}.so8t_rotation": _scaled_block(_rotations(8), 3, 1.01)},
                       rf"{Q}\.so8t_rotation block 3 is not orthogonal"),
    "reflection": ({f"{Q}.so8t_rotation": _reflected_block(_rotations(8), 5)},
                   rf"{Q}\.so8t_rotation block 5 is a reflection, not a rotation: det = -1"),
    "nan": ({f"{Q}.so8t_generator": _with(skew(8, 0), 2, 0, 1, np.nan)},
            rf"{Q}\.so8t_generator block 2 holds NaN"),
    "not skew": ({f"{Q}.so8t_generator": _with(skew(8, 0), 1, 0, 1, 0.5)},
                 rf"{Q}\.so8t_generator block 1 is not skew-symmetric"),
    "missing weight": ({"blk.7.attn_q.weight.so8t_generator": skew(8, 0)},
                       "blk.7.attn_q.weight, a tensor the model lacks"),
    "head of a tied model": ({"output.weight.so8t_rotation": _rotations(8)},
                             "output.weight, a tensor the model lacks"),
    "wrong shape": ({f"{Q}.so8t_generator": skew(4, 0)},
                    r"has shape \(4, 8, 8\), expected \(8, 8, 8\) for input width 64"),
    "norm": ({"blk.0.attn_norm.weight.so8t_generator": skew(8, 0)},
             r"blk.0.attn_norm.weight has shape \(64,\): only weight matrices"),
    "embedding": ({"token_embd.weight.so8t_rotation": _rotations(8)},
                  "token_embd.weight cannot be gated"),
    "both kinds": ({f"{Q}.so8t_generator": skew(8, 0), f"{Q}.so8t_rotation": _rotations(8)},
                   "exactly one"),
    "alpha alone": ({f"{Q}.so8t_alpha": np.array(0.5, np.float32)},
                    "exactly one"),
    "alpha with rotation": ({f"{Q}.so8t_rotation": _rotations(8), f"{Q}.so8t_alpha": np.array(0.5, np.float32)},
                            "scales a generator"),
    "alpha not scalar": ({f"{Q}.so8t_generator": skew(8, 0), f"{Q}.so8t_alpha": np.zeros(2, np.float32)},
                         r"alpha has shape \(2,\), expected a scalar"),
    "unknown suffix": ({f"{Q}.lora_a": np.zeros((4, 64), np.float32)},
                       "lora_a is not <weight name>"),
    "empty": ({}, "no SO8T gates"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS, ids=list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused(tied, tmp_path, case):
    tensors, message = BAD_CHECKPOINTS[case]
    path = tmp_path / "gates.safetensors"
    save_file(tensors, path)
    with pytest.raises(InputError, match=message) as refused:
        make_plan(f"file:{path}", TensorSource(tied[0]))
    assert "\n" not in str(refused.value) and str(refused.value).startswith("gates.safetensors: ")


def test_pickle_and_missing_checkpoints_are_refused(tied, tmp_path):
    source = TensorSource(tied[0])
    pickled = tmp_path / "gates.pt"
    torch.save({f"{Q}.so8t_generator": torch.from_numpy(skew(8, 0))}, pickled)
    with pytest.raises(InputError, match="gates.pt: not a readable safetensors file"):
        make_plan(f"file:{pickled}", source)
    with pytest.raises(InputError, match="no such SO8T checkpoint"):
        make_plan(f"file:{tmp_path / 'absent.safetensors'}", source)


# ---- memory -----------------------------------------------------------------------------------

_BAKE_AND_REPORT_PEAK = """
import sys
from nkat_gguf.so8t.bake import bake_rotations, make_plan
from nkat_gguf.format.gguf_file import write_gguf
from nkat_gguf.format.tensors import TensorSource
source = TensorSource(sys.argv[1])
baked = bake_rotations(source, make_plan("random", source, seed=1, heads=True))
write_gguf(sys.argv[2], baked.metadata, baked.specs, baked.produce)
status = open("/proc/self/status").read().splitlines()
print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """8 layers vs 2: the peak may grow by the extra mapped input pages, not by the baked layers.

    A wide FFN makes each layer (10 MiB) large next to the 49152 × 256 embedding (48 MiB).
    Measured: 2 layers 515 MiB, 8 layers 573-576 MiB; growth 58-60 MiB for 57.8 MiB more input file.
    Keeping every baked layer alive instead (a deliberate leak) grew it by about twice the file growth.
    """
    shape = LlamaShape(d_model=256, n_ff=3072, n_head=8, n_head_kv=2)
    per_layer = 4 * (2 * 256 * 256 + 2 * 64 * 256 + 3 * 3072 * 256)  # F32 bytes of one layer
    peaks, sizes = {}, {}
    for n_layers in (2, 8):
        src = build_llama_gguf(tmp_path / f"l{n_layers}.gguf", dataclasses.replace(shape, n_layers=n_layers))
        done = subprocess.run([sys.executable, "-c", _BAKE_AND_REPORT_PEAK, str(src), str(tmp_path / "out.gguf")],
                              capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
        peaks[n_layers], sizes[n_layers] = int(done.stdout), src.stat().st_size
    growth, mapped = peaks[8] - peaks[2], sizes[8] - sizes[2]
    print(f"peak RSS 2 layers {peaks[2] / 2**20:.1f} MiB, 8 layers {peaks[8] / 2**20:.1f} MiB; "
          f"growth {growth / 2**20:.1f} MiB, input file growth {mapped / 2**20:.1f} MiB")
    assert growth <= mapped + 2 * per_layer  # holding the 6 extra baked layers would add ≥ 6 × per_layer


# ---- the real default model -------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_hadamard_keeps_the_function(tmp_path):
    """Measured: max |Δz| 6.2e-5, mean KL 5.0e-12 over 64 tokens (logits up to 36)."""
    source = TensorSource(default_model_path())
    metadata = copy_metadata(source.layout)
    metadata["general.file_type"] = Value(GGUFValueType.UINT32, 0)
    specs = [TensorSpec(t.name, source.numpy_shape(t.name), GGMLQuantizationType.F32) for t in source.layout.tensors]
    pre = tmp_path / "default-f32.gguf"
    write_gguf(pre, metadata, specs, lambda spec: source.dequantize(spec.name))
    post = bake(default_model_path(), tmp_path / "default-hadamard.gguf", "hadamard")
    assert len(read_layout(post).tensors) == len(specs) + 1  # the tied head became output.weight
    max_dz, mean_kl = divergence(logits(pre), logits(post))
    print(f"default model, hadamard: max |Δz| {max_dz:.3g}, mean KL {mean_kl:.3g}")
    assert max_dz <= MAX_ABS_DZ and mean_kl <= MAX_MEAN_KL
