"""The θ step on a real (tiny) model: whitened vs diagonal fits, and LoftQ-style joint rounds through llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.convert.calibrate import Calibration, calibrate
from nkat_gguf.convert.selection import default_theta_tensors
from nkat_gguf.engine.llama.quantize import outtypes, quantize_model, quantize_rows
from nkat_gguf.engine.llama.runtime import NkatRuntime
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.nkat import read_theta
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.theta import expected_output_error
from nkat_gguf.texts import load_text


@pytest.fixture(scope="module")
def calibration(tiny_f32: Path) -> Calibration:
    return calibrate(tiny_f32, load_text(None, "calibration"), calib_tokens=2048, second_moments=True,
                     progress=False)


@pytest.mark.parametrize("outtype", ["Q4_0", "IQ4_NL"])
def test_per_tensor_requantization_is_llama_cpps(tiny_f32: Path, calibration: Calibration, tmp_path: Path,
                                                 outtype: str) -> None:
    """ggml_quantize_chunk with the weight's importance row gives the bytes llama_model_quantize writes."""
    dst = tmp_path / "q.gguf"
    quantize_model(tiny_f32, dst, outtypes()[outtype], calibration.mean_squares)
    source, quantized = TensorSource(tiny_f32), TensorSource(dst)
    for name in default_theta_tensors(read_layout(dst)):
        ggml_type = quantized.info(name).type
        raw = quantize_rows(name, source.dequantize(name), ggml_type, calibration.mean_squares[name])
        np.testing.assert_array_equal(raw.reshape(quantized.raw(name).shape), quantized.raw(name), err_msg=name)


def convert_tiny(tiny_f32: Path, out: Path, calibration: Calibration, **options) -> dict:
    opts = ConvertOptions(input=tiny_f32, output=out, outtype="Q4_0", theta_rank=4, progress=False, **options)
    return convert(opts, calibration).as_dict()


def test_whitening_lowers_the_expected_output_error(tiny_f32: Path, calibration: Calibration, tmp_path: Path) -> None:
    diag = convert_tiny(tiny_f32, tmp_path / "d.gguf", calibration, theta_fit="diag")
    whiten = convert_tiny(tiny_f32, tmp_path / "w.gguf", calibration, theta_fit="whiten", theta_damping=0.001)
    total = {r["theta_fit"]: sum(t["expected_output_error"] for t in r["tensors"].values()) for r in (diag, whiten)}
    assert total["whiten"] < 0.97 * total["diag"]


def test_joint_rounds_keep_the_best_round_and_write_its_weights(tiny_f32: Path, calibration: Calibration,
                                                                tmp_path: Path) -> None:
    one = convert_tiny(tiny_f32, tmp_path / "r1.gguf", calibration, theta_rounds=1)
    three = convert_tiny(tiny_f32, tmp_path / "r3.gguf", calibration, theta_rounds=3)
    for name, t in three["tensors"].items():
        assert t["expected_output_error"] <= one["tensors"][name]["expected_output_error"] * (1 + 1e-9)
    joint = [n for n, t in three["tensors"].items() if t["round"] > 0]
    assert joint, "no weight took a joint round on this model: the test shows nothing"
    # the error reported is the error of what the file holds: its weights plus its stored θ
    out, source = TensorSource(tmp_path / "r3.gguf"), TensorSource(tiny_f32)
    theta = read_theta(out.layout)
    for name in joint[:3]:
        factors = theta.tensors[name].dequantize()
        residual = source.dequantize(name) - out.dequantize(name)
        error = expected_output_error(residual, factors.dense(), calibration.second_moments[name])
        assert error == pytest.approx(three["tensors"][name]["expected_output_error"], rel=1e-6)
        assert not np.array_equal(out.raw(name), TensorSource(tmp_path / "r1.gguf").raw(name))
    with NkatRuntime(tmp_path / "r3.gguf") as rt:  # llama.cpp loads the rewritten file with its adapter
        assert rt.has_theta
    assert out.info(joint[0]).type == GGMLQuantizationType.Q4_0
