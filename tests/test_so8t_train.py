"""`so8t train`: the gate parametrisation, the quantizer emulation against llama.cpp's own quantizer,
frozen base weights, a short run whose checkpoint convert bakes with QC passing, resume, and refusals.

Real parts: tiny gguf-py llama models, ggml's `ggml_quantize_chunk` (the function llama-quantize calls)
through ctypes, gguf-py's dequantizer, and convert's bake + QC on the trained checkpoint.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from safetensors.numpy import load_file

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.format.gguf_file import write_with_metadata
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.so8t import So8tOptions
from nkat_gguf.so8t.fake_quant import EXACT, dequantized, fake_quantize
from nkat_gguf.so8t.train import (
    ALPHA_INIT,
    STATE_SUFFIX,
    FrozenLlama,
    Gate,
    QuantObjective,
    TrainOptions,
    block_figures,
    train,
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *args], capture_output=True, text=True, check=False,
                          timeout=300, cwd=Path(__file__).parents[1])


def quick(model: Path, output: Path, **kw) -> TrainOptions:
    return TrainOptions(model=model, output=output, steps=2, batch=1, ctx=64, eval_sequences=1, lr=0.1,
                        threads=1, progress=False, **kw)


# ---- the gate -------------------------------------------------------------------------------------


def test_exp_of_a_skew_block_is_a_rotation() -> None:
    gate = Gate(64)
    with torch.no_grad():
        gate.raw.copy_(torch.randn(8, 8, 8) * 3)  # large angles, not just near the identity
        gate.alpha.fill_(4.0)
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):  # float32: the training precision
        err, det = block_figures(gate.to(dtype).rotation())
        assert err.max() < tol and np.abs(det - 1).max() < tol


def test_the_gate_starts_closed_at_the_identity() -> None:
    gate = Gate(64)
    assert float(gate.sigma()) == pytest.approx(1 / (1 + np.exp(-ALPHA_INIT)), rel=1e-7)
    assert float(gate.sigma()) == pytest.approx(0.006692850924, rel=1e-6)
    assert torch.equal(gate.rotation(), torch.eye(8).repeat(8, 1, 1))


def test_only_generators_and_alphas_learn(tiny_f32: Path) -> None:
    model = FrozenLlama(TensorSource(tiny_f32), torch.float32, torch.device("cpu"), fold_norms=True,
                        progress=False)
    objective = QuantObjective(model, TrainOptions(model=tiny_f32, output=Path("x"), heads=True))
    before = {k: v.clone() for k, v in model.weights.items()}
    params = [p for g in objective.gates.values() for p in g.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.1)
    tokens = torch.randint(0, 1000, (1, 32))
    with torch.no_grad():
        target = torch.log_softmax(model.logits(tokens, objective.reference_fn(), checkpointed=False), -1)
    for _ in range(2):  # α's gradient is 0 while A = 0; from the second step on both move
        optimizer.zero_grad()
        objective.loss(model.logits(tokens, objective.weight_fn(), checkpointed=True), tokens, target).backward()
        optimizer.step()
    assert all(not w.requires_grad and w.grad is None for w in model.weights.values())
    assert all(torch.equal(before[k], model.weights[k]) for k in before)
    gate = objective.gates["residual"]
    assert gate.raw.grad.abs().max() > 0 and gate.alpha.grad.abs() > 0
    assert float(gate.alpha) != ALPHA_INIT


# ---- the quantizer emulation ----------------------------------------------------------------------

_GGML = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
_GGML.ggml_quantize_chunk.restype = ctypes.c_size_t
_GGML.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]


def llama_cpp_dequantized(x: np.ndarray, kind: str, imatrix: np.ndarray | None) -> np.ndarray:
    """ggml_quantize_chunk (what llama_model_quantize runs per tensor), then gguf-py's dequantizer."""
    qtype = GGMLQuantizationType[kind]
    block, size = GGML_QUANT_SIZES[qtype]
    rows, n = x.shape
    dst = np.zeros((rows, n // block * size), np.uint8)
    src = np.ascontiguousarray(x, np.float32)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    _GGML.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, n,
                              None if im is None else im.ctypes.data)
    return quants.dequantize(dst, qtype).reshape(rows, n)


@pytest.mark.parametrize("kind", EXACT)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_fake_quantizer_matches_llama_cpp_bit_for_bit(kind: str, with_imatrix: bool) -> None:
    rng = np.random.default_rng(1)
    # heavy-tailed rows with outliers, as real weights have
    x = (rng.standard_normal((96, 576)) * rng.gamma(1.0, 1.0, (96, 576))).astype(np.float32)
    imatrix = rng.gamma(0.5, 2.0, 576).astype(np.float32) if with_imatrix else None
    expected = llama_cpp_dequantized(x, kind, imatrix)
    got = dequantized(torch.from_numpy(x), kind, None if imatrix is None else torch.from_numpy(imatrix)).numpy()
    assert np.array_equal(got, expected)


def test_fake_quantize_is_the_quantized_value_with_a_straight_through_gradient() -> None:
    w = torch.randn(4, 64, requires_grad=True)
    y = fake_quantize(w, "Q4_0")
    assert torch.equal(y.detach(), dequantized(w, "Q4_0"))
    y.sum().backward()
    assert torch.isfinite(w.grad).all() and (w.grad != 0).any()


# ---- training end to end --------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["quant", "lm"])
def test_a_short_run_writes_a_checkpoint_convert_bakes_with_qc_passing(objective: str, tiny_f32: Path,
                                                                       tmp_path: Path) -> None:
    gates = tmp_path / "gates.safetensors"
    extra = {"heads": True, "quant_layers": 1} if objective == "quant" else {}  # R2, and the layer draw
    result = train(quick(tiny_f32, gates, objective=objective, **extra))
    assert result.steps == 2 and [h["step"] for h in result.history] == [1, 2]
    tensors = load_file(gates)
    generators = {k: v for k, v in tensors.items() if k.endswith(".so8t_generator")}
    if objective == "quant":  # R1 moves every step; an R2 only in the steps that drew its layer
        assert "blk.1.attn_heads.so8t_alpha" in tensors
        assert np.abs(tensors["residual.so8t_generator"]).max() > 0
    else:
        assert all(np.abs(v).max() > 0 for v in generators.values())
        assert set(generators) == {"blk.0.attn_output.weight.so8t_generator", "blk.1.attn_output.weight.so8t_generator"}
    out = tmp_path / "baked.gguf"
    report = convert(ConvertOptions(input=tiny_f32, output=out, outtype="Q8_0", theta_rank=0, imatrix="none",
                                    so8t=So8tOptions(mode=f"file:{gates}"), progress=False))
    assert report.so8t["qc"]["passed"], report.so8t["qc"]


def test_the_same_command_resumes_the_step_count(tiny_f32: Path, tmp_path: Path) -> None:
    gates = tmp_path / "gates.safetensors"
    first = train(quick(tiny_f32, gates, objective="lm"))
    assert Path(str(gates) + STATE_SUFFIX).is_file()
    resumed = train(TrainOptions(**{**quick(tiny_f32, gates, objective="lm").__dict__, "steps": 3}))
    assert resumed.resumed_from == 2
    assert [h["step"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history


# ---- refusals -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tiny_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    other = tmp_path_factory.mktemp("qwen") / "qwen.gguf"
    write_with_metadata(tiny_f32, other, {"general.architecture": "qwen2"})
    return other


@pytest.mark.parametrize("case, extra, message", [
    ("objective", ["--objective", "spin"], "unknown objective 'spin'"),
    ("steps", ["--steps", "0"], "--steps must be at least 1"),
    ("arch", [], "supports the llama architecture"),
    ("output", ["-o", "/nonexistent-dir/g.safetensors"], "output directory does not exist"),
    ("short", ["--train-text", "SHORT"], "the training text has"),
    ("outtype", ["--outtype", "Q2_K"], "not emulated"),
])
def test_bad_input_is_one_line(case: str, extra: list[str], message: str, tiny_f32: Path, qwen: Path,
                               tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n")
    model = qwen if case == "arch" else tiny_f32
    args = ["so8t", "train", "-m", str(model), "-o", str(tmp_path / "g.safetensors"), "--steps", "1",
            "--threads", "1"]
    proc = run_cli(*args, *[str(short) if a == "SHORT" else a for a in extra])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "g.safetensors").exists()


@pytest.mark.parametrize("quant_layers", [0, 1])
def test_rotations_alone_preserve_the_function(quant_layers: int, tiny_f32: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With the quantizer replaced by the identity, random R1 and R2 leave the logits unchanged."""
    import nkat_gguf.so8t.train as so8t_train

    monkeypatch.setattr(so8t_train, "fake_quantize", lambda w, kind, imatrix=None: w)
    model = FrozenLlama(TensorSource(tiny_f32), torch.float64, torch.device("cpu"), fold_norms=True, progress=False)
    objective = QuantObjective(model, TrainOptions(model=tiny_f32, output=Path("x"), heads=True,
                                                   quant_layers=quant_layers))
    with torch.no_grad():
        for gate in objective.gates.values():
            gate.raw.copy_(torch.randn_like(gate.raw))
            gate.alpha.fill_(3.0)
            gate.double()
        tokens = torch.randint(0, 1000, (2, 16))
        reference = model.logits(tokens, objective.reference_fn(), checkpointed=False)
        rotated = model.logits(tokens, objective.weight_fn(step=3), checkpointed=False)
    assert objective.gates["residual"].rotation().sub(torch.eye(8)).abs().max() > 0.5  # far from the identity
    assert (reference - rotated).abs().max() < 1e-5
