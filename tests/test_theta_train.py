"""Learned θ (convert --theta-train): never worse than the closed form it starts from, stored as trained and
recorded as trained, deterministic, resumable after an interrupt, and bad options refused in one line. Tiny
synthetic llamas, real llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGMLQuantizationType

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.convert.theta_fit import WeightFit, replace_tensors
from nkat_gguf.convert.theta_train import TrainSettings, train_theta
from nkat_gguf.engine.forward.llama import LlamaForward
from nkat_gguf.engine.llama.adapter import cache_root
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format import nkat
from nkat_gguf.format.nkat import read_theta
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.theta import LowRank, quantize_int8
from nkat_gguf.math.theta_train import TrainableTheta, fake_int8
from nkat_gguf.texts import load_text
from tests.test_cli_errors import run_cli

# Max |torch − llama.cpp| logit with the trained θ on an F32 model (F32 KV cache, no flash attention), asserted
# with a margin: measured 5.4e-6 (logits up to 5.4; θ moves them by up to 1.1), the plain forward's bound on tiny
# models in tests/test_reference.py.
LOGIT_TOLERANCE = 1e-4
FAST = TrainSettings("block", steps=4, lr=5e-3, tokens=512)


def _convert(src: Path, out: Path, train: TrainSettings, **kw: object) -> dict:
    opts = ConvertOptions(input=src, output=out, theta_rank=4, progress=False, calib_tokens=512,
                          theta_train=train.mode, theta_train_steps=train.steps, theta_train_lr=train.lr,
                          theta_train_tokens=train.tokens, theta_train_seed=train.seed, **{"outtype": "Q4_0", **kw})
    return convert(opts).as_dict()


# ---- the math: trained as stored ------------------------------------------------------------------


def test_fake_int8_is_quantize_int8_value_for_value_with_identity_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 40, generator=gen), torch.randn(30, 5, generator=gen) * 7
    stored = quantize_int8(LowRank(b.numpy(), a.numpy())).dequantize()
    np.testing.assert_array_equal(fake_int8(a, dim=1).numpy(), stored.a)
    np.testing.assert_array_equal(fake_int8(b, dim=0).numpy(), stored.b)
    a.requires_grad_()
    fake_int8(a, dim=1).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), np.ones_like(a.detach().numpy()))


def test_stored_factors_are_the_ones_the_forward_computes_with() -> None:
    gen = torch.Generator().manual_seed(4)
    start = quantize_int8(LowRank(torch.randn(24, 3, generator=gen).numpy(), torch.randn(3, 16, generator=gen).numpy()))
    theta = TrainableTheta(start, gamma=0.9, device=torch.device("cpu"))
    with torch.no_grad():
        theta.a.add_(0.01 * torch.randn(theta.a.shape, generator=gen))
        theta.b.add_(0.01 * torch.randn(theta.b.shape, generator=gen))
        a, b = theta.factors()
    stored = theta.stored().dequantize()
    np.testing.assert_array_equal(a.numpy(), stored.a)
    np.testing.assert_array_equal(b.numpy(), stored.b)


# ---- convert --theta-train ------------------------------------------------------------------------


@pytest.mark.parametrize("train", [FAST, TrainSettings("block", steps=4, lr=1.0, tokens=512),
                                   TrainSettings("model", steps=2, lr=5e-3, tokens=512)],
                         ids=["block", "block-lr-too-large", "model"])
def test_training_never_ends_above_the_closed_form(train: TrainSettings, tiny_f32: Path, tmp_path: Path) -> None:
    result = _convert(tiny_f32, tmp_path / "out.gguf", train)
    report = result["theta_train"]
    assert report["mode"] == train.mode and report["tokens"] == 512 and report["seconds"] > 0
    assert report["peak_resident_bytes"] > 0 and report["resumed_blocks"] == 0
    for initial, final in ((v["initial"], v["final"]) for v in report["losses"].values()):
        assert 0 < final <= initial
    if train.lr < 1:  # a sane step size does lower the loss, so the bound above is not all the test sees
        assert report["final_loss"] < report["initial_loss"]
    for name, tensor in result["tensors"].items():  # what is true of trained factors, not the closed form's figures
        assert tensor["captured_energy"] is None and tensor["expected_output_error"] is None
        scope = "model" if train.mode == "model" else ".".join(name.split(".")[:2])
        assert tensor["training_loss"] == {"scope": scope, **report["losses"][scope]}
    recorded = read_theta(result["output"]).provenance
    assert {k: recorded[k] for k in (nkat.TRAIN_MODE, nkat.TRAIN_STEPS, nkat.TRAIN_LR, nkat.TRAIN_TOKENS,
                                     nkat.TRAIN_SEED, nkat.TRAIN_DEVICE)} == {
        nkat.TRAIN_MODE: train.mode, nkat.TRAIN_STEPS: train.steps, nkat.TRAIN_LR: train.lr,
        nkat.TRAIN_TOKENS: 512, nkat.TRAIN_SEED: train.seed, nkat.TRAIN_DEVICE: report["device"]}
    assert (recorded[nkat.TRAIN_INITIAL_LOSS], recorded[nkat.TRAIN_FINAL_LOSS]) == (report["initial_loss"],
                                                                                    report["final_loss"])


def test_training_is_deterministic_for_a_seed(tiny_f32: Path, tmp_path: Path) -> None:
    thetas = []
    for run in ("a", "b"):
        _convert(tiny_f32, tmp_path / f"{run}.gguf", FAST)
        thetas.append(read_theta(tmp_path / f"{run}.gguf"))
    closed = read_theta(_convert(tiny_f32, tmp_path / "closed.gguf", TrainSettings("none", 1, 1e-3, 512))["output"])
    first, second = thetas
    assert first.tensors.keys() == second.tensors.keys() == closed.tensors.keys()
    for name, t in first.tensors.items():
        u = second.tensors[name]
        for part in ("a", "a_scale", "b", "b_scale"):
            np.testing.assert_array_equal(getattr(t, part), getattr(u, part), err_msg=f"{name}.{part}")
    assert any(not np.array_equal(t.b, closed.tensors[n].b) for n, t in first.tensors.items())  # training moved θ


def test_closed_form_files_record_no_training(tiny_nkat: Path) -> None:
    assert not any(k.startswith("nkat.train.") for k in read_theta(tiny_nkat).provenance)


def test_an_interrupted_block_training_resumes_where_it_stopped(tiny_f32: Path, tmp_path: Path) -> None:
    closed = tmp_path / "closed.gguf"
    _convert(tiny_f32, closed, TrainSettings("none", 1, 1e-3, 512))
    theta = read_theta(closed)
    fits = {n: WeightFit(t, 0.0, None, 0) for n, t in theta.tensors.items()}
    args = (FAST, TensorSource(tiny_f32), closed, fits, theta.gamma, load_text(None, "calibration"))
    checkpoints = cache_root() / "theta-train"

    whole = train_theta(*args, progress=False)
    assert not list(checkpoints.glob("*/*.npz"))  # a finished training leaves no checkpoint
    interrupted = train_theta(*args, progress=False, block_limit=1)  # stops after blk.0, as an interrupt would
    assert list(interrupted.summary["losses"]) == ["blk.0"]
    assert [p.name for p in checkpoints.glob("*/*.npz")] == ["blk.0.npz"]
    resumed = train_theta(*args, progress=False)

    assert (whole.summary["resumed_blocks"], resumed.summary["resumed_blocks"]) == (0, 1)
    assert resumed.summary["losses"] == whole.summary["losses"] and len(whole.summary["losses"]) == 2
    for name, fit in whole.fits.items():
        for part in ("a", "a_scale", "b", "b_scale"):
            np.testing.assert_array_equal(getattr(resumed.fits[name].theta, part), getattr(fit.theta, part),
                                          err_msg=f"{name}.{part}")
    assert not list(checkpoints.glob("*/*.npz"))


@pytest.fixture(scope="module")
def f32_pair(tiny_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(input, reference): tiny_f32 with its block weights rounded through Q4_0, still F32, and tiny_f32 itself.
    Converted with --outtype same, llama.cpp and torch both multiply in float32, so their logits agree closely."""
    source = TensorSource(tiny_f32)
    rounded = {}
    for t in read_layout(tiny_f32).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            w = source.dequantize(t.name)
            rounded[t.name] = quants.dequantize(quants.quantize(w, GGMLQuantizationType.Q4_0),
                                                GGMLQuantizationType.Q4_0).astype(np.float32)
    rounded_path = tmp_path_factory.mktemp("f32-pair") / "rounded-f32.gguf"
    replace_tensors(tiny_f32, rounded_path, rounded)
    return rounded_path, tiny_f32


def test_the_file_reproduces_the_trained_logits_in_llama_cpp(f32_pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, reference = f32_pair
    out = tmp_path / "trained.gguf"
    _convert(src, out, FAST, outtype="same", reference=reference, imatrix="none")
    theta = read_theta(out)
    sequences = [list(range(100, 164)), list(range(3000, 3040))]

    model = LlamaForward(out)
    corrections = {n: TrainableTheta(t, theta.gamma, torch.device("cpu")) for n, t in theta.tensors.items()}
    ours, plain = [], []
    with torch.no_grad():
        for seq in sequences:
            for found, fix in ((ours, corrections), (plain, {})):
                batch = model.batch([seq])
                h = model.embed(batch)
                for i in range(model.config.n_layer):
                    h = model.block(i, model.layer(i), h, batch, fix)
                found.append(model.head(h).numpy())
    options = RuntimeOptions(n_ctx=64, f32_kv_cache=True, logits_all=True, n_threads=2)
    with NkatRuntime(out, options) as runtime:
        theirs = []
        for seq in sequences:
            runtime.llm.reset()
            runtime.llm.eval(seq)
            theirs.append(np.array(runtime.llm.scores[:len(seq)], dtype=np.float32))
    a, b, off = np.concatenate(ours), np.concatenate(theirs), np.concatenate(plain)
    assert np.abs(a - b).max() <= LOGIT_TOLERANCE
    assert np.abs(a - off).max() > 100 * LOGIT_TOLERANCE  # θ does matter at this tolerance


# ---- bad options: one line each ---------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--theta-train", "layer"], "--theta-train"),
    (["--theta-train", "block", "--theta-train-steps", "0"], "--theta-train-steps"),
    (["--theta-train", "block", "--theta-train-lr", "0"], "--theta-train-lr"),
    (["--theta-train", "block", "--theta-train-lr", "nan"], "--theta-train-lr"),
    (["--theta-train", "block", "--theta-train-lr", "2"], "--theta-train-lr"),
    (["--theta-train", "block", "--theta-train-tokens", "100"], "--theta-train-tokens"),
    (["--theta-train", "block", "--theta-rank", "0"], "trains theta"),
])
def test_bad_training_options_are_one_line(extra: list[str], message: str, tiny_f32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    proc = run_cli("convert", "--input", str(tiny_f32), "--output", str(out), "--theta-rank", "2", *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_library_refuses_bad_training_options(tiny_f32: Path, tmp_path: Path) -> None:
    for bad, message in (({"theta_train_steps": 0}, "--theta-train-steps"),
                         ({"theta_train_steps": 2.5}, "--theta-train-steps"),
                         ({"theta_train_lr": float("inf")}, "--theta-train-lr"),
                         ({"theta_train_tokens": 1 << 30}, "--theta-train-tokens"),
                         ({"theta_train": "sometimes"}, "--theta-train")):
        opts = ConvertOptions(input=tiny_f32, output=tmp_path / "out.gguf", progress=False,
                              **{"theta_train": "block", **bad})
        with pytest.raises(InputError, match=message):
            convert(opts)
    assert list(tmp_path.iterdir()) == []
