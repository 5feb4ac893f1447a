"""`convert --so8t` end to end: bake, QC before quantizing, write only if QC passes (or --force), report.

Real parts throughout: tiny gguf-py models, llama.cpp for both sides of QC, the PyTorch forward for
trained gates applied online. Deliberately broken rotations are passed as a BakePlan through the Python
API (the command line only builds correct ones); the command line's refusal is shown with `qc bake`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from safetensors.numpy import save_file

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.engine.forward.llama import LlamaForward
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout, write_gguf
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.so8t import So8tOptions, check_so8t_options
from nkat_gguf.so8t.bake import bake_rotations, make_plan
from nkat_gguf.so8t.qc import MAX_ABS_DZ, MAX_MEAN_KL, QCFailed, qc_text, qc_tokens, forward_logits
from nkat_gguf.so8t.rotations import apply_blocks_right, so8_blocks_from_generators
from tools.synthetic_model import TINY, build_llama_gguf


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])


def so8t_keys(path: Path) -> dict:
    return {k: v.python() for k, v in read_layout(path).metadata.items() if k.startswith("nkat.so8t.")}


SO8T_OPTION = {"so8t": "mode", "so8t_seed": "seed", "so8t_heads": "heads", "force": "force", "report_dir": "report_dir"}


def quick(tiny: Path, output: Path, imatrix: str = "none", **so8t) -> ConvertOptions:
    """No theta and no calibration: these tests are about the bake step, not θ."""
    return ConvertOptions(input=tiny, output=output, outtype="Q8_0", theta_rank=0, imatrix=imatrix, progress=False,
                          so8t=So8tOptions(**{SO8T_OPTION[k]: v for k, v in so8t.items()}))


# ---- passing: the command line, "same" outtype, metadata and the report ---------------------------


def test_cli_hadamard_passes_qc_writes_and_reports(tmp_path):
    """A Q8_0 input: the bake is F32 inside, yet --outtype same gives Q8_0, the input's type."""
    q8 = build_llama_gguf(tmp_path / "tiny-q8.gguf", TINY, GGMLQuantizationType.Q8_0, seed=4)
    out, report_dir = tmp_path / "out.gguf", tmp_path / "qc" / "run1"
    done = run_cli("convert", "--input", str(q8), "-o", str(out), "--outtype", "same", "--theta-rank", "2",
                   "--so8t", "hadamard",
                   "--so8t-seed", "3", "--report", str(report_dir), "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    qc = printed["so8t"]["qc"]
    assert qc["passed"] and qc["max_abs_dz"] <= MAX_ABS_DZ and qc["mean_kl"] <= MAX_MEAN_KL
    assert qc["top1_agreement"] == 1.0 and qc["tokens"] == 128
    assert qc["pre"] == "llama.cpp on an F32 copy of the input"

    layout = read_layout(out)
    assert layout.get("general.file_type") == read_layout(q8).get("general.file_type") == 7  # MOSTLY_Q8_0
    assert {t.name: t.type for t in layout.tensors}["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert "output.weight" in {t.name for t in layout.tensors}  # the tied head became its own tensor
    keys = so8t_keys(out)
    assert keys["nkat.so8t.mode"] == "hadamard" and keys["nkat.so8t.seed"] == 3
    assert keys["nkat.so8t.qc.passed"] is True and keys["nkat.so8t.qc.forced"] is False
    assert keys["nkat.so8t.qc.mean_kl"] == pytest.approx(qc["mean_kl"], rel=1e-6)
    assert keys["nkat.so8t.max_orthogonality_error"] < 1e-12 and keys["nkat.so8t.min_det"] == pytest.approx(1.0)
    assert layout.get("nkat.theta.rank") == 2  # θ still there, fitted against the rotated reference

    written = json.loads((report_dir / "so8t-qc.json").read_text())
    assert written["so8t"] == printed["so8t"] and written["output"] == str(out)
    markdown = (report_dir / "so8t-qc.md").read_text()
    assert "verdict: passed" in markdown and "| mean KL(p_pre ‖ p_post) |" in markdown
    assert sorted(p.name for p in report_dir.iterdir()) == ["so8t-qc.json", "so8t-qc.md"]


# ---- failing: nothing written; --force writes and records -----------------------------------------


def test_broken_rotation_fails_qc_and_writes_nothing(tiny_f32, tmp_path):
    plan = make_plan("random", TensorSource(tiny_f32), seed=3)
    noise = 0.02 * np.random.default_rng(0).standard_normal(plan.residual.shape)
    broken = dataclasses.replace(plan, residual=plan.residual + noise)
    out, reports = tmp_path / "out.gguf", tmp_path / "reports"
    with pytest.raises(QCFailed) as failed:
        convert(quick(tiny_f32, out, so8t=broken, report_dir=reports))
    message = str(failed.value)
    assert "\n" not in message and message.startswith("SO8T QC failed (random (seed 3)")
    for check in ("mean KL", "max |Δz|", "max ‖RᵀR − I‖_F"):
        assert check in message
    assert message.endswith("nothing written (--force writes anyway)")
    assert list(tmp_path.iterdir()) == []  # no output, no report, no temporary directory

    report = convert(quick(tiny_f32, out, so8t=broken, force=True, report_dir=reports))
    keys = so8t_keys(out)
    assert keys["nkat.so8t.qc.passed"] is False and keys["nkat.so8t.qc.forced"] is True
    assert keys["nkat.so8t.qc.max_abs_dz"] > 10 * MAX_ABS_DZ and keys["nkat.so8t.qc.mean_kl"] > MAX_MEAN_KL
    assert "mean KL" in keys["nkat.so8t.qc.failures"]
    assert report.so8t["forced"] is True and report.so8t["qc"]["passed"] is False
    assert "written anyway (--force)" in (reports / "so8t-qc.md").read_text()


def test_reflection_keeps_the_function_but_fails_the_det_check(tiny_f32, tmp_path):
    """Any orthogonal Q keeps the function, a reflection too: only the det check catches it."""
    plan = make_plan("random", TensorSource(tiny_f32), seed=3)
    reflected = plan.residual.copy()
    reflected[2, :, 0] *= -1
    with pytest.raises(QCFailed, match=r"SO8T QC failed .*: min det -1 <= 0 \(a reflection\); nothing written"):
        convert(quick(tiny_f32, tmp_path / "out.gguf", so8t=dataclasses.replace(plan, residual=reflected)))
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_in_one_line_and_leaves_nothing(tiny_f32, tmp_path):
    """A reflection in a trained-gate checkpoint is refused when loaded, before any baking."""
    blocks = so8_blocks_from_generators(np.zeros((8, 8, 8)))
    blocks[5, 0] *= -1
    save_file({"blk.0.attn_q.weight.so8t_rotation": blocks.astype(np.float32)}, tmp_path / "gates.safetensors")
    out = tmp_path / "out.gguf"
    done = run_cli("convert", "--input", str(tiny_f32), "-o", str(out), "--so8t", f"file:{tmp_path / 'gates.safetensors'}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "blk.0.attn_q.weight.so8t_rotation block 5 is a reflection" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gates.safetensors"]


@pytest.mark.parametrize("extra, message", [
    ({"so8t_seed": 1}, "--so8t-seed goes with"),
    ({"so8t_heads": True}, "--so8t-heads goes with"),
    ({"force": True}, "--force goes with"),
    ({"report_dir": Path("r")}, "--report goes with"),
    ({"so8t": "hadamard", "imatrix": "model.imatrix"}, "--imatrix FILE describes the inputs of the unrotated"),
    ({"so8t": "file:g.safetensors", "so8t_seed": 1}, "trained gates"),
])
def test_options_that_do_not_go_together_are_refused_before_any_work(tiny_f32, tmp_path, extra, message):
    opts = quick(tiny_f32, tmp_path / "out.gguf", **extra)
    with pytest.raises(InputError, match=re.escape(message)):
        convert(opts)
    assert list(tmp_path.iterdir()) == []


def test_so8t_checks_give_the_plan_the_bake_uses(tiny_f32):
    """SO8T's own check, the one convert's checks call: no plan without --so8t, the mode parsed once for this
    model, a mode it cannot take refused before any work."""
    source = TensorSource(tiny_f32)
    assert check_so8t_options(So8tOptions(), source, "auto", reuses_calibration=False) is None
    plan = check_so8t_options(So8tOptions(mode="random", seed=3, heads=True), source, "auto", reuses_calibration=False)
    assert (plan.mode, plan.seed) == ("random", 3) and len(plan.heads) == TINY.n_layers
    np.testing.assert_array_equal(plan.residual, make_plan("random", source, seed=3).residual)
    assert check_so8t_options(So8tOptions(mode=plan), source, "none", reuses_calibration=False) is plan
    with pytest.raises(InputError, match="unknown SO8T mode 'bogus'"):
        check_so8t_options(So8tOptions(mode="bogus"), source, "auto", reuses_calibration=False)
    with pytest.raises(ValueError, match="cannot be reused with --so8t"):
        check_so8t_options(So8tOptions(mode="hadamard"), source, "auto", reuses_calibration=True)


# ---- trained gates: the reference with the gate online is the "pre" side ---------------------------


def test_trained_gates_round_trip_against_the_reference(tiny_f32, tmp_path):
    generators = {name: np.random.default_rng(i).standard_normal((width // 8, 8, 8)).astype(np.float32)
                  for i, (name, width) in enumerate([("blk.0.attn_q.weight", 64), ("blk.1.ffn_down.weight", 128)])}
    tensors = {f"{n}.so8t_generator": (g - g.transpose(0, 2, 1)) / 2 for n, g in generators.items()}
    tensors["blk.1.ffn_down.weight.so8t_alpha"] = np.array(1.5, np.float32)
    save_file(tensors, tmp_path / "gates.safetensors")
    source = TensorSource(tiny_f32)
    plan = make_plan(f"file:{tmp_path / 'gates.safetensors'}", source)
    tokens = qc_tokens(tiny_f32, qc_text())

    def folded_weights(name: str) -> np.ndarray:
        w = source.dequantize(name)
        return apply_blocks_right(w.astype(np.float64), plan.gates[name]) if name in plan.gates else w

    # the online gate W·(R·x), hooked into the reference, is the reference on the folded weights W·R
    online = forward_logits(source, tokens, plan.gates)
    folded = LlamaForward(source, weights=folded_weights).logits([tokens])[0]
    np.testing.assert_allclose(online, folded, atol=1e-4)
    assert np.abs(online - forward_logits(source, tokens, {})).max() > 100 * MAX_ABS_DZ  # the gates matter

    out = tmp_path / "gated.gguf"
    report = convert(ConvertOptions(input=tiny_f32, output=out, outtype="Q8_0", theta_rank=2, progress=False,
                                    so8t=So8tOptions(f"file:{tmp_path / 'gates.safetensors'}")))
    qc = report.so8t["qc"]
    assert qc["pre"] == "PyTorch forward with the gates applied online"
    assert qc["passed"] and qc["max_abs_dz"] <= MAX_ABS_DZ and qc["mean_kl"] <= MAX_MEAN_KL, qc
    keys = so8t_keys(out)
    assert keys["nkat.so8t.mode"] == "file" and keys["nkat.so8t.checkpoint"] == "gates.safetensors"
    assert "output.weight" not in {t.name for t in read_layout(out).tensors}  # gates leave the head tied


# ---- nkat-gguf qc bake ---------------------------------------------------------------------------------


def test_qc_bake_cli(tiny_f32, tmp_path):
    source = TensorSource(tiny_f32)
    baked = bake_rotations(source, make_plan("random", source, seed=2, heads=True))
    post = tmp_path / "post.gguf"
    write_gguf(post, baked.metadata, baked.specs, baked.produce)
    done = run_cli("qc", "bake", "--pre", str(tiny_f32), "--post", str(post), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["passed"] and result["mode"] == "random" and result["tokens"] == 128
    assert result["max_abs_dz"] <= MAX_ABS_DZ and result["mean_kl"] <= MAX_MEAN_KL
    assert result["max_orthogonality_error"] < 1e-12  # read from the post file's nkat.so8t.* keys

    other = build_llama_gguf(tmp_path / "other.gguf", TINY, seed=1)
    done = run_cli("qc", "bake", "--pre", str(tiny_f32), "--post", str(other), "--json")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: SO8T QC failed: mean KL") and "max |Δz|" in lines[0]
    result = json.loads(done.stdout)
    assert not result["passed"] and result["mode"] == "gguf" and result["max_orthogonality_error"] is None
    assert result["top1_agreement"] < 0.5

