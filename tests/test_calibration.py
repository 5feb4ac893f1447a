"""Calibration inside llama.cpp's graph: struct layout, statistics per weight, imatrix file, cache, bad input."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nkat_gguf.engine.calibrate.calibration as graph
from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.convert.calibrate import (
    DEFAULT_CALIB_TOKENS,
    calibrate,
    calibrate_with_forward,
    calibration_windows,
    recorded_weights,
)
from nkat_gguf.convert.selection import select_tensors
from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.calibrate.ggml_tensor import GgmlTensor, check_layout, layout_problems
from nkat_gguf.engine.llama.quantize import quantize_model, resolve_outtype
from nkat_gguf.engine.forward.llama import LlamaForward
from nkat_gguf.engine.llama.vocab import tokenize
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout, write_with_metadata
from nkat_gguf.format.imatrix import input_widths, read_imatrix_file
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.texts import Text, load_text
from tools.synthetic_model import build_qwen2_gguf

CALIBRATION = load_text(None, "calibration")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen2_gguf(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2-f32.gguf")


def test_struct_layout_matches_the_installed_ggml() -> None:
    check_layout()
    assert layout_problems(GgmlTensor) == []


def test_a_different_layout_of_the_same_size_is_caught() -> None:
    """As if ne were int32 (every later field moves up 16 bytes) with 16 bytes more padding at the end."""
    fields = [("ne", ctypes.c_int32 * 4) if f[0] == "ne" else ("padding", ctypes.c_char * 24) if f[0] == "padding"
              else f for f in GgmlTensor._fields_]

    class Moved(ctypes.Structure):
        _fields_ = fields

    assert ctypes.sizeof(Moved) == ctypes.sizeof(GgmlTensor)
    assert any(p.startswith("ne reads") for p in layout_problems(Moved))


@pytest.mark.parametrize("model", ["tiny_f32", "tiny_qwen2"])
def test_every_adapted_weight_gets_statistics(model: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    windows = calibration_windows(path, CALIBRATION, 1024)
    stats = graph.collect_statistics(path, windows, recorded_weights(path), second_moments=True, threads=1,
                                     progress=False)
    widths = input_widths(read_layout(path))
    adapted = select_tensors(read_layout(path), None)
    assert set(adapted) <= set(stats.sums) and stats.tokens == 1024
    means, seconds = stats.mean_squares(), stats.take_second_moments()
    for name in adapted:
        assert stats.counts[name].tolist() == [1024], name
        assert means[name].shape == (widths[name],) and means[name].dtype == np.float32
        assert np.all(means[name] > 0)
        # the diagonal of E[x xᵀ] is E[x²]: two accumulations of the same inputs agree
        np.testing.assert_allclose(np.diag(seconds[name]), means[name], rtol=1e-4)
    for i in range(2):
        p = f"blk.{i}."
        assert seconds[p + "attn_q.weight"] is seconds[p + "attn_k.weight"] is seconds[p + "attn_v.weight"]
        assert seconds[p + "ffn_gate.weight"] is seconds[p + "ffn_up.weight"]
        assert seconds[p + "ffn_down.weight"] is not seconds[p + "ffn_up.weight"]
    assert "token_embd.weight" not in stats.sums


def test_llama_cpp_statistics_match_the_pytorch_reference_on_an_f32_model(tiny_f32: Path) -> None:
    """F32 weights: llama.cpp and the reference differ only by rounding (and the F16 KV cache)."""
    ours = calibrate(tiny_f32, CALIBRATION, 1024, threads=1, progress=False, cache=False)
    source = TensorSource(tiny_f32)
    theirs = calibrate_with_forward(source, source.dequantize, tiny_f32, CALIBRATION, 1024, progress=False)
    assert ours.tokens == theirs.tokens == 1024
    for name, expected in theirs.mean_squares.items():
        rel = np.linalg.norm(ours.mean_squares[name] - expected) / np.linalg.norm(expected)
        assert rel < 2e-3, (name, rel)


def test_llama_cpp_second_moments_match_the_pytorch_reference_on_an_f32_model(tiny_f32: Path) -> None:
    """Σxxᵀ summed in float32 per window, with shared inputs read once, against the reference's float64 xᵀx."""
    windows = calibration_windows(tiny_f32, CALIBRATION, 1024)
    ours = graph.collect_statistics(tiny_f32, windows, recorded_weights(tiny_f32), second_moments=True, threads=1,
                                    progress=False).take_second_moments()
    _, theirs = LlamaForward(TensorSource(tiny_f32)).input_statistics(windows)
    assert ours.keys() == theirs.keys()
    for name, expected in theirs.items():
        assert ours[name].dtype == np.float32
        rel = np.linalg.norm(ours[name] - expected) / np.linalg.norm(expected)
        assert rel < 2e-3, (name, rel)


def test_saved_imatrix_round_trips_and_quantizes_like_the_calibration(tiny_qwen2: Path, tmp_path: Path) -> None:
    saved = tmp_path / "tiny.imatrix.gguf"
    calibration = calibrate(tiny_qwen2, CALIBRATION, 1024, threads=1, progress=False, save_imatrix=saved)
    layout = read_layout(saved)
    assert layout.get("general.type") == "imatrix" and layout.get("imatrix.chunk_count") == 2
    assert layout.get("imatrix.chunk_size") == 512 and layout.get("imatrix.datasets") == [CALIBRATION.source]
    widths = input_widths(read_layout(tiny_qwen2))
    back = read_imatrix_file(saved, widths)
    assert back.keys() == calibration.mean_squares.keys()
    for name, values in calibration.mean_squares.items():
        assert np.array_equal(back[name], values), name
    ftype = resolve_outtype("Q4_0", read_layout(tiny_qwen2))[1]
    from_file, in_memory = tmp_path / "file.gguf", tmp_path / "memory.gguf"
    quantize_model(tiny_qwen2, from_file, ftype, back)
    quantize_model(tiny_qwen2, in_memory, ftype, calibration.mean_squares)
    plain = tmp_path / "plain.gguf"
    quantize_model(tiny_qwen2, plain, ftype, None)
    name = "blk.0.ffn_down.weight"
    assert np.array_equal(TensorSource(from_file).raw(name), TensorSource(in_memory).raw(name))
    assert not np.array_equal(TensorSource(from_file).raw(name), TensorSource(plain).raw(name))


def test_cache_returns_the_stored_statistics_without_llama_cpp(tiny_f32: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NKAT_CACHE_DIR", str(tmp_path))
    first = calibrate(tiny_f32, CALIBRATION, 512, second_moments=True, threads=1, progress=False)
    assert len(list((tmp_path / "calibrations").glob("*.npz"))) == 1

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr("nkat_gguf.convert.calibrate.collect_statistics", refuse)
    again = calibrate(tiny_f32, CALIBRATION, 512, second_moments=True, threads=1, progress=False)
    assert again.tokens == first.tokens and again.second_moments.keys() == first.second_moments.keys()
    for name in first.mean_squares:
        assert np.array_equal(again.mean_squares[name], first.mean_squares[name])
    assert again.second_moments["blk.0.attn_q.weight"] is again.second_moments["blk.0.attn_v.weight"]
    with pytest.raises(AssertionError, match="recomputed"):  # another token count is another key
        calibrate(tiny_f32, CALIBRATION, 1024, threads=1, progress=False)


def test_convert_gives_a_non_llama_model_the_importance_matrix_and_activation_theta(tiny_qwen2: Path,
                                                                                    tmp_path: Path) -> None:
    report = convert(ConvertOptions(input=tiny_qwen2, output=tmp_path / "q.nkat.gguf", outtype="Q4_0",
                                    theta_rank=2, calib_tokens=1024, progress=False))
    assert report.imatrix == "calibration" and report.calibration == "activation"
    assert len(report.tensors) == 14 and not report.notes and report.peak_resident_bytes > 0
    assert read_layout(tmp_path / "q.nkat.gguf").get("nkat.calibration.tokens") == 1024


def test_windows_default_and_bounds(tiny_f32: Path) -> None:
    n_tokens = len(tokenize(tiny_f32, CALIBRATION.content))
    windows = calibration_windows(tiny_f32, CALIBRATION)
    assert len(windows) * 512 == min(DEFAULT_CALIB_TOKENS, n_tokens // 512 * 512)
    assert all(len(w) == 512 for w in windows)
    assert len(calibration_windows(tiny_f32, CALIBRATION, 1300)) == 2  # rounded down to whole windows
    with pytest.raises(InputError, match="smaller than one window"):
        calibration_windows(tiny_f32, CALIBRATION, 100)
    with pytest.raises(InputError, match="more than the calibration text holds"):
        calibration_windows(tiny_f32, CALIBRATION, n_tokens + 512)
    with pytest.raises(InputError, match="fewer than one window"):
        calibration_windows(tiny_f32, Text("only a few words", "short.txt"))


def test_a_model_llama_cpp_cannot_load_is_one_line(tiny_f32: Path, tmp_path: Path) -> None:
    alien = tmp_path / "alien.gguf"
    write_with_metadata(tiny_f32, alien, {"general.architecture": "nkat-unknown-arch"})
    with pytest.raises(InputError, match="llama.cpp cannot load"):
        graph.collect_statistics(alien, [[1] * 512], progress=False)


@pytest.mark.parametrize("extra, message", [
    (["--calib-tokens", "100"], "smaller than one window"),
    (["--calib-tokens", "10000000"], "more than the calibration text holds"),
    (["--calib-text", "SHORT"], "fewer than one window"),
])
def test_calibration_bad_input_from_the_cli(extra: list[str], message: str, tiny_f32: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("A short calibration text.\n")
    out = tmp_path / "out.nkat.gguf"
    args = [str(short) if a == "SHORT" else a for a in extra]
    command = [sys.executable, "-m", "nkat_gguf.cli", "convert", "--input", str(tiny_f32), "--output", str(out),
               "--theta-rank", "2", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_default_model_every_adapted_weight_and_close_to_the_reference() -> None:
    """Q4_1 weights: llama.cpp multiplies them with Q8 activations, the reference in F32; same tokens."""
    model = default_model_path()
    ours = calibrate(model, CALIBRATION, 1024, threads=2, progress=False, cache=False)
    source = TensorSource(model)
    theirs = calibrate_with_forward(source, source.dequantize, model, CALIBRATION, 1024, progress=False)
    assert set(select_tensors(source.layout, None)) <= ours.mean_squares.keys()
    assert ours.mean_squares.keys() == theirs.mean_squares.keys()
    worst = max(np.linalg.norm(ours.mean_squares[n] - v) / np.linalg.norm(v) for n, v in theirs.mean_squares.items())
    assert worst < 0.05, worst  # BENCHMARKS.md: 0.016 at most over 4,096 tokens, median 0.001
