"""qc confidence and qc longtext on real GGUFs in llama.cpp; the temperature's round trip through a file,
`serve` (a real request) and the exports; the reports and plots; short texts and short contexts."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.engine.serve.server import ChatServer
from nkat_gguf.errors import InputError
from nkat_gguf.evaluate.confidence import CalibrationSettings, calibration_report, fitted_temperature, write_temperature
from nkat_gguf.evaluate.longtext import LongtextSettings, longtext_report, without_series
from nkat_gguf.evaluate.qc_reports import write_calibration_report, write_longtext_report
from nkat_gguf.export.exports import export_kobold, export_ollama
from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import read_layout, write_with_metadata
from nkat_gguf.format.nkat import CalibratedTemperature, read_temperature
from nkat_gguf.texts import Text, load_text

OPTIONS = RuntimeOptions(n_ctx=512, n_batch=512, n_threads=2)
QUICK = CalibrationSettings(n_chunks=2, calib_chunks=1, progress=False)
MIN_PNG_BYTES = 20_000  # a chart with axes, curves and a legend; an empty figure is ~5 kB


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def calibration(tiny_nkat: Path, tiny_f32: Path) -> dict:
    return calibration_report(tiny_nkat, load_text(None, "evaluation"), load_text(None, "calibration"), OPTIONS,
                              QUICK, reference=tiny_f32)


@pytest.fixture(scope="module")
def tempered(tiny_nkat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_nkat with a temperature written by write_temperature (a value well away from any default)."""
    out = tmp_path_factory.mktemp("tempered") / "tiny.t.gguf"
    write_temperature(tiny_nkat, out, CalibratedTemperature(1.375, "ab" * 32, 255, 0.97))
    return out


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size >= MIN_PNG_BYTES


def test_calibration_report_rows_and_perplexity_agree(calibration: dict, tiny_nkat: Path) -> None:
    assert list(calibration["configurations"]) == ["theta", "theta_off", "reference"]
    theta = calibration["configurations"]["theta"]
    assert theta["gamma"] == pytest.approx(0.97) and theta["before"]["tokens"] == 2 * 255
    assert 0.5 <= theta["temperature"] <= 3.0
    for config in calibration["configurations"].values():  # the hook saw the logits llama-perplexity scored
        assert config["before"]["perplexity"] == pytest.approx(config["perplexity"]["ppl"], rel=1e-5)
        assert config["after"]["nll"] != config["before"]["nll"]
    with NkatRuntime(tiny_nkat, OPTIONS) as runtime:
        runtime.set_gamma(None)
        plain = perplexity(runtime.llm, tokenize_text(runtime.llm, load_text(None, "evaluation").content), 512, 2,
                           progress=False)
    assert calibration["configurations"]["theta_off"]["perplexity"]["ppl"] == pytest.approx(plain.ppl, rel=1e-6)


def test_write_temperature_round_trip(calibration: dict, tiny_nkat: Path, tmp_path: Path) -> None:
    before = digest(tiny_nkat)
    fitted = fitted_temperature(calibration)
    out = tmp_path / "calibrated.gguf"
    write_temperature(tiny_nkat, out, fitted)
    stored = read_temperature(out)
    assert stored is not None and stored.temperature == pytest.approx(fitted.temperature, rel=1e-6)
    assert stored.gamma == pytest.approx(0.97) and stored.tokens == 255
    assert stored.text_sha256 == load_text(None, "calibration").sha256
    assert digest(tiny_nkat) == before and read_temperature(tiny_nkat) is None
    with NkatRuntime(out, OPTIONS) as runtime:  # still a loadable model, theta intact
        assert runtime.has_theta and runtime.temperature == stored
    with pytest.raises(InputError, match="is the input model"):
        write_temperature(out, out, fitted)


def test_temperature_keys_old_and_new(tiny_nkat: Path, tmp_path: Path) -> None:
    """Files from before the rename hold nkat.calibration.temperature*: read as before, replaced on rewrite."""
    fitted = CalibratedTemperature(1.25, "ab" * 32, 255, 0.97)
    legacy = tmp_path / "legacy.gguf"
    write_with_metadata(tiny_nkat, legacy, {nkat.LEGACY_TEMPERATURE_KEYS[k]: v for k, v in fitted.metadata().items()})
    assert nkat.TEMPERATURE not in read_layout(legacy).metadata
    current = tmp_path / "current.gguf"
    write_temperature(tiny_nkat, current, fitted)
    stored = read_temperature(legacy)
    assert stored == read_temperature(current)
    assert stored is not None and stored.temperature == pytest.approx(1.25) and stored.gamma == pytest.approx(0.97)
    rewritten = tmp_path / "rewritten.gguf"
    write_temperature(legacy, rewritten, replace(fitted, temperature=1.5))
    keys = set(read_layout(rewritten).metadata)
    assert nkat.TEMPERATURE in keys and not keys & set(nkat.LEGACY_TEMPERATURE_KEYS.values())
    assert read_temperature(rewritten).temperature == pytest.approx(1.5)


def test_convert_calibrate_temperature(tiny_f32: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.nkat.gguf"
    report = convert(ConvertOptions(input=tiny_f32, output=out, outtype="Q4_0", theta_rank=4, progress=False,
                                    calibrate_temperature=True))
    stored = read_temperature(out)
    assert stored is not None and report.temperature["temperature"] == pytest.approx(stored.temperature, rel=1e-6)
    assert stored.gamma == pytest.approx(0.97) and stored.tokens == 4 * 255


def test_serve_uses_the_stored_temperature(tempered: Path) -> None:
    with NkatRuntime(tempered, OPTIONS) as runtime, ChatServer(runtime, port=0, quiet=True) as server:
        server.start()
        with urllib.request.urlopen(server.url + "/models", timeout=60) as response:
            info = json.loads(response.read())["data"][0]["nkat"]
        assert info["default_temperature"] == pytest.approx(1.375)
        assert info["default_temperature_source"] == nkat.TEMPERATURE
        for body, expected in (({}, 1.375), ({"temperature": 0}, 0)):
            request = urllib.request.Request(
                server.url + "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 4, "seed": 1, **body}).encode(),
                {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            assert answer["nkat_temperature"] == pytest.approx(expected) and answer["choices"]


def test_server_without_temperature_keeps_the_library_default(tiny_nkat: Path) -> None:
    with NkatRuntime(tiny_nkat, OPTIONS) as runtime, ChatServer(runtime, port=0, quiet=True) as server:
        assert server.default_temperature is None
        assert server.models()["data"][0]["nkat"]["default_temperature_source"] == "llama-cpp-python"


def test_exports_carry_the_temperature(tempered: Path, tiny_nkat: Path, tmp_path: Path) -> None:
    ollama = export_ollama(tempered, tmp_path / "o")
    assert "PARAMETER temperature 1.3750" in Path(ollama.files["modelfile"]).read_text().splitlines()
    assert any(nkat.TEMPERATURE in note for note in ollama.notes)
    kobold = export_kobold(tempered, tmp_path / "k")
    config = json.loads(Path(kobold.files["kcpps"]).read_text())
    assert json.loads(config["gendefaults"]) == {"temperature": 1.375}
    plain = export_ollama(tiny_nkat, tmp_path / "p")
    assert "temperature" not in Path(plain.files["modelfile"]).read_text()
    assert "gendefaults" not in json.loads(Path(export_kobold(tiny_nkat, tmp_path / "pk").files["kcpps"]).read_text())


def test_calibration_report_files(calibration: dict, tmp_path: Path) -> None:
    files = write_calibration_report(tmp_path / "r", calibration)
    assert [p.name for p in files] == ["calibration.json", "calibration.md", "reliability.png"]
    assert json.loads(files[0].read_text())["configurations"]["reference"]["before"]["ece"] >= 0
    assert "| reference |" in files[1].read_text()
    assert is_png(files[2])


def test_longtext_caps_a_short_context_and_writes_plots(tiny_nkat: Path, tiny_f32: Path, tmp_path: Path) -> None:
    """tiny models are trained on 2,048 tokens: --tokens 4096 is capped, and the report says so."""
    report = longtext_report(tiny_nkat, load_text(None, "evaluation"), OPTIONS,
                             LongtextSettings(tokens=4096, gen_tokens=24, progress=False), reference=tiny_f32)
    assert report["window_tokens"] == 2048 and "capped at 2048" in report["notes"][0]
    theta = report["configurations"]["theta"]
    assert theta["teacher_forced"]["positions"] == 2048
    assert len(theta["teacher_forced"]["series"]["max_logit_d2"]) == 2046
    for generation in theta["generation"].values():
        assert 1 <= generation["tokens"] <= 24 and 0.0 <= generation["repetition_share"] <= 1.0
        assert generation["stop"] in ("max_tokens", "end_of_generation")
    assert "series" not in json.dumps(without_series(report))
    files = write_longtext_report(tmp_path / "l", report)
    assert [p.name for p in files] == ["longtext.json", "longtext.md", "entropy.png", "max_logit.png"]
    assert all(is_png(p) for p in files[2:])


def test_text_too_short_is_one_clear_line(tiny_nkat: Path, tmp_path: Path) -> None:
    short = Text("A few words only.", "short.txt")
    with pytest.raises(InputError, match="text too short"):
        longtext_report(tiny_nkat, short, OPTIONS, LongtextSettings(tokens=256, gen_tokens=4, progress=False))
    with pytest.raises(InputError, match="text too short"):
        calibration_report(tiny_nkat, short, short, OPTIONS, QUICK)
    path = tmp_path / "short.txt"
    path.write_text("A few words only.\n")
    for command in (["qc", "longtext", str(tiny_nkat), "--text", str(path), "--tokens", "256"],
                    ["qc", "confidence", str(tiny_nkat), "--calib-text", str(path), "--chunks", "1"],
                    ["qc", "calibration", str(tiny_nkat), "--calib-text", str(path), "--chunks", "1"]):  # old name
        done = subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *command, "--threads", "2"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and done.stderr.strip().count("\n") == 0, done.stderr
        assert done.stderr.startswith("Error: text too short")


@pytest.mark.slow
def test_default_model_calibration_is_measured_not_assumed(default_q4_0_rank8: Path) -> None:
    """On the default convert: θ on and off are both measured, T is inside the bracket, the reference is found."""
    report = calibration_report(default_q4_0_rank8, load_text(None, "evaluation"), load_text(None, "calibration"),
                                OPTIONS, replace(QUICK, n_chunks=4, calib_chunks=2))
    assert report["reference"] == str(default_model_path())
    for config in report["configurations"].values():
        assert 0.5 < config["temperature"] < 3.0 and math.isfinite(config["after"]["ece"])
        assert config["before"]["perplexity"] == pytest.approx(config["perplexity"]["ppl"], rel=1e-5)
    on, off = report["configurations"]["theta"]["before"], report["configurations"]["theta_off"]["before"]
    assert on["nll"] != off["nll"] and np.isfinite(on["brier"])


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_a_bad_stored_temperature_is_refused(tiny_f32: Path, tmp_path: Path, value: float) -> None:
    bad = tmp_path / "bad.gguf"
    write_with_metadata(tiny_f32, bad, {nkat.TEMPERATURE: value})
    with pytest.raises(InputError, match="must be a positive number"):
        read_temperature(bad)
