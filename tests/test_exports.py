"""Exports: the adapter gives the engine's logits, the Modelfile and .kcpps parse back, merged loads and is measured.

Logits are compared on F32 base weights: on a quantized base llama.cpp's CPU matmuls round their
inputs to 8 bits, so any change in the last float bit (even γ·(1+1e-7)) can flip a rounding and
move a logit by ~1 on the default model; F32 weights take no such rounding, so the comparison is tight.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType

from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.export.exports import export_adapter, export_kobold, export_ollama, modelfile_text
from nkat_gguf.format.gguf_file import read_layout, write_with_metadata
from nkat_gguf.format.nkat import read_theta, theta_metadata
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.texts import builtin_text
from tests import runtime_formats

TEXT = builtin_text("evaluation").content[:20_000]
N_TOKENS = 64
# max |Δlogit| allowed between the exported adapter at scale 1 and the engine at γ (F32 base, F32 KV cache).
# Measured on the tiny model: F32 1.8e-6, F16 3.3e-4 (the F16 rounding of A and γ·B), theta itself moves logits ~0.9.
TOLERANCE = {"F32": 1e-5, "F16": 2e-3}


@pytest.fixture(scope="module")
def f32_with_theta(tiny_f32: Path, tiny_nkat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_f32's F32 weights carrying tiny_nkat's theta: a base whose matmuls do not round activations."""
    out = tmp_path_factory.mktemp("f32-theta") / "tiny-f32.nkat.gguf"
    write_with_metadata(tiny_f32, out, theta_metadata(read_theta(tiny_nkat)))
    return out


def scores(llm: llama_cpp.Llama) -> np.ndarray:
    tokens = llm.tokenize(TEXT.encode())[:N_TOKENS]
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:N_TOKENS])


def engine_scores(model: Path, gamma: float | None) -> np.ndarray:
    options = RuntimeOptions(n_ctx=128, n_batch=128, n_threads=2, f32_kv_cache=True, logits_all=True)
    with NkatRuntime(model, options, gamma=gamma) as runtime:
        if gamma is None:
            runtime.set_gamma(None)
        return scores(runtime.llm)


def lora_scores(model: Path, adapter: Path) -> np.ndarray:
    llm = llama_cpp.Llama(str(model), lora_path=str(adapter), lora_scale=1.0, n_ctx=128, n_batch=128, n_threads=2,
                          type_k=0, type_v=0, logits_all=True, verbose=False)
    try:
        return scores(llm)
    finally:
        llm.close()


@pytest.mark.parametrize("tensor_type", ["F32", "F16"])
@pytest.mark.parametrize("gamma", [0.97, 2.5])
def test_adapter_at_scale_one_gives_the_engine_logits_at_gamma(f32_with_theta: Path, tmp_path: Path,
                                                                tensor_type: str, gamma: float) -> None:
    adapter = tmp_path / "theta.gguf"
    report = export_adapter(f32_with_theta, adapter, gamma, tensor_type)
    assert report.files == {"adapter": str(adapter)} and report.gamma == gamma

    engine = engine_scores(f32_with_theta, gamma)
    exported = lora_scores(f32_with_theta, adapter)
    theta_effect = np.abs(engine - engine_scores(f32_with_theta, None)).max()
    assert np.abs(exported - engine).max() <= TOLERANCE[tensor_type]
    assert theta_effect > 100 * TOLERANCE[tensor_type]  # the comparison is not vacuous


def test_adapter_file_is_a_standard_llama_cpp_lora(tiny_nkat: Path, tmp_path: Path) -> None:
    """F16 by default, alpha = 0 (unit scale whatever each tensor's rank), and B holds γ·B of the NKAT file (what a runtime at scale 1 needs)."""
    adapter = tmp_path / "theta.gguf"
    report = export_adapter(tiny_nkat, adapter, gamma=0.5)
    layout = read_layout(adapter)
    theta = read_theta(tiny_nkat)
    assert layout.get("general.type") == "adapter" and layout.get("adapter.type") == "lora"
    assert layout.get("general.architecture") == "llama" and layout.get("adapter.lora.alpha") == 0.0
    assert {t.type for t in layout.tensors} == {GGMLQuantizationType.F16}
    name = sorted(theta.tensors)[0]
    b = TensorSource(adapter).dequantize(name + ".lora_b")
    np.testing.assert_allclose(b, (0.5 * theta.tensors[name].dequantize().b).astype(np.float16), rtol=0, atol=0)
    assert report.commands == [f"llama-cli -m {tiny_nkat} --lora {adapter}"]
    assert "folded" in report.notes[0]


def parse_modelfile(path: Path) -> list[tuple[str, str]]:
    """The Modelfile as Ollama's own parser reads it (tests/runtime_formats.py, from parser/parser.go), with
    every PARAMETER typed as `ollama create` types it; (COMMAND, argument) pairs, FROM/ADAPTER/PARAMETER NAME."""
    commands = runtime_formats.parse_modelfile(path.read_text(encoding="utf-8"))
    request = runtime_formats.modelfile_request(commands)
    assert len(request["from"]) == 1 and len(request["adapters"]) <= 1, request  # Ollama keeps one adapter
    return [("FROM" if c == "model" else "ADAPTER" if c == "adapter" else f"PARAMETER {c}", a) for c, a in commands]


def assert_ollama_reads(path: Path) -> None:
    assert runtime_formats.ollama_gguf_problems(read_layout(path)) == [], path


@pytest.mark.parametrize("stop", ["<|im_end|>", "</s>", "<｜end▁of▁sentence｜>", 'say "end"', " lead", "a\nb", '"""'])
def test_modelfile_stop_strings_reach_ollama_unchanged(stop: str) -> None:
    text = modelfile_text("m.gguf", None, 2048, [stop], temperature=0.8125)
    request = runtime_formats.modelfile_request(runtime_formats.parse_modelfile(text))
    assert request["parameters"] == {"num_ctx": 2048, "temperature": pytest.approx(0.8125), "stop": [stop]}


def test_modelfile_parser_port_refuses_what_ollama_refuses() -> None:
    """The port is only worth its checks if it fails where Ollama fails (messages of parser.go)."""
    bad = {"PARAMETER stop \"open\n": "open quote", "FRM ./m.gguf\n": "command must be one of",
           "ADAPTER ./a.gguf\n": "no FROM line", "FROM ./m.gguf\nPARAMETER num_ctx 2k\n": "invalid int",
           "FROM ./m.gguf\nPARAMETER context 4\n": "unknown parameter", "FROM m\nMESSAGE bot hi\n": "message role"}
    for text, message in bad.items():
        with pytest.raises(runtime_formats.ModelfileError, match=message):
            runtime_formats.modelfile_request(runtime_formats.parse_modelfile(text))
    assert runtime_formats.parse_modelfile("# c\nfrom  m\nSYSTEM \"\"\"a\nb\"\"\"\n") == [("model", "m"), ("system", "a\nb")]


def test_ollama_directory(tiny_nkat: Path, tmp_path: Path) -> None:
    directory = tmp_path / "ollama"
    report = export_ollama(tiny_nkat, directory, gamma=0.5, name="tiny-nkat")
    modelfile = directory / "Modelfile"
    instructions = parse_modelfile(modelfile)
    assert instructions[0][0] == "FROM"
    files = {kind: (directory / arg).resolve() for kind, arg in instructions if kind in ("FROM", "ADAPTER")}
    assert all(arg.startswith("./") for kind, arg in instructions if kind in ("FROM", "ADAPTER"))
    assert set(files) == {"FROM", "ADAPTER"} and all(p.is_file() for p in files.values())
    params = runtime_formats.modelfile_request(runtime_formats.parse_modelfile(modelfile.read_text()))["parameters"]
    assert params == {"num_ctx": 2048, "stop": ["<|im_end|>"]}  # context_length; eos and the template's end token
    assert report.commands == [f"ollama create tiny-nkat -f {modelfile.resolve()}", "ollama run tiny-nkat"]

    # the model file is the plain quantized model: same tensors byte for byte, no theta metadata
    base, source = TensorSource(files["FROM"]), TensorSource(tiny_nkat)
    assert not any(k.startswith("nkat.") for k in base.layout.metadata)
    assert all(np.array_equal(base.raw(t.name), source.raw(t.name)) for t in source.layout.tensors)
    assert read_layout(files["ADAPTER"]).get("general.type") == "adapter"
    for path in files.values():
        assert_ollama_reads(path)


def test_ollama_merged_keeps_tensor_types_and_reports_perplexity(tiny_nkat: Path, tmp_path: Path) -> None:
    directory = tmp_path / "merged"
    report = export_ollama(tiny_nkat, directory, gamma=1.0, merged=True, ppl_chunks=2, threads=2)
    instructions = parse_modelfile(directory / "Modelfile")
    assert [k for k, _ in instructions].count("ADAPTER") == 0 and instructions[0][0] == "FROM"
    merged = TensorSource(directory / instructions[0][1])
    assert_ollama_reads(directory / instructions[0][1])
    source = TensorSource(tiny_nkat)
    theta = read_theta(tiny_nkat)
    assert [(t.name, t.type) for t in merged.layout.tensors] == [(t.name, t.type) for t in source.layout.tensors]
    assert not any(k.startswith("nkat.") for k in merged.layout.metadata)
    for t in source.layout.tensors:
        if t.name in theta.tensors:  # W' = dequant(W_q) + γ·B·A, quantized as llama.cpp's reference Q4_0 does
            f = theta.tensors[t.name].dequantize()
            expected = quants.quantize(source.dequantize(t.name) + f.b @ f.a, GGMLQuantizationType.Q4_0)
            assert np.array_equal(merged.raw(t.name), expected), t.name
        else:
            assert np.array_equal(merged.raw(t.name), source.raw(t.name)), t.name

    ppl = report.perplexity
    assert {"theta_off", "adapter", "merged"} <= set(ppl)
    assert all(math.isfinite(ppl[k]["ppl"]) and ppl[k]["n_chunks"] == 2 for k in ("theta_off", "adapter", "merged"))
    assert any(n.startswith("perplexity (2 chunks of 512): theta_off") for n in report.notes)
    with NkatRuntime(tiny_nkat, RuntimeOptions(n_ctx=512, n_threads=2), gamma=1.0) as runtime:  # the adapter figure
        tokens = tokenize_text(runtime.llm, builtin_text("evaluation").content)
        assert ppl["adapter"]["ppl"] == pytest.approx(perplexity(runtime.llm, tokens, 512, 2, progress=False).ppl,
                                                      rel=1e-6)


def test_ollama_merged_outtype_goes_through_llama_cpp(tiny_nkat: Path, tmp_path: Path) -> None:
    report = export_ollama(tiny_nkat, tmp_path, merged=True, outtype="Q8_0", ppl_chunks=1, threads=2)
    layout = read_layout(report.files["model"])
    assert layout.get("general.file_type") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert {t.type for t in layout.tensors if len(t.shape) == 2} == {GGMLQuantizationType.Q8_0}


def test_kobold_config(tiny_nkat: Path, tmp_path: Path) -> None:
    report = export_kobold(tiny_nkat, tmp_path / "kobold", gamma=0.5, threads=3)
    kcpps = Path(report.files["kcpps"])
    config = json.loads(kcpps.read_text())
    assert Path(config["model_param"]) == tiny_nkat.resolve()
    assert isinstance(config["lora"], list) and len(config["lora"]) == 1 and Path(config["lora"][0]).is_file()
    assert config["loramult"] == 1.0 and config["contextsize"] == 2048 and config["threads"] == 3
    assert config["host"] == "127.0.0.1"
    assert report.commands == [f"koboldcpp --config {kcpps}"]
    for version in ("1.76", "1.102"):  # the releases whose koboldcpp.py argparse was read
        assert runtime_formats.kcpps_problems(config, version) == [], version


def test_kcpps_rules_fail_where_koboldcpp_would() -> None:
    good = {"model_param": "/m.gguf", "lora": ["/a.gguf"], "contextsize": 2048, "threads": 2, "launch": False}
    assert runtime_formats.kcpps_problems(good, "1.76") == []
    bad = {"lora": "/a.gguf", "contextsize": 128, "threads": "2", "launch": 0, "lora_path": "/a.gguf"}
    problems = runtime_formats.kcpps_problems(bad, "1.102")
    assert [p.split(":")[0] for p in problems] == ["lora", "contextsize", "threads", "launch", "lora_path"], problems


def test_model_without_theta_still_exports(tiny_f32: Path, tmp_path: Path) -> None:
    adapter = export_adapter(tiny_f32, tmp_path / "theta.gguf", gamma=0.5)
    assert adapter.gamma is None and read_layout(adapter.files["adapter"]).tensors == []
    assert any("no correction to carry" in n for n in adapter.notes)
    assert any("--gamma 0.5 ignored" in n for n in adapter.notes)

    ollama = export_ollama(tiny_f32, tmp_path / "ollama")
    assert "adapter" not in ollama.files and any("no correction to carry" in n for n in ollama.notes)
    assert [k for k, _ in parse_modelfile(Path(ollama.files["modelfile"]))] == ["FROM", "PARAMETER num_ctx",
                                                                                 "PARAMETER stop"]

    kobold = export_kobold(tiny_f32, tmp_path / "kobold")
    config = json.loads(Path(kobold.files["kcpps"]).read_text())
    assert config["lora"] is None and runtime_formats.kcpps_problems(config, "1.76") == []
    assert any("no correction to carry" in n for n in kobold.notes)


def test_bad_output_dir_and_arguments(tiny_nkat: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match="cannot create output directory"):
        export_ollama(tiny_nkat, blocker / "sub")
    with pytest.raises(InputError, match="cannot create output directory"):
        export_kobold(tiny_nkat, blocker)
    with pytest.raises(InputError, match="cannot create output directory"):
        export_adapter(tiny_nkat, blocker / "theta.gguf")
    with pytest.raises(InputError, match="gamma must be a number"):
        export_adapter(tiny_nkat, tmp_path / "t.gguf", gamma=float("nan"))
    with pytest.raises(InputError, match="out of range"):
        export_kobold(tiny_nkat, tmp_path / "k", gamma=-1.0)
    with pytest.raises(InputError, match="not an Ollama model name"):
        export_ollama(tiny_nkat, tmp_path / "o", name="bad name!")
    with pytest.raises(InputError, match="--outtype applies to --merged only"):
        export_ollama(tiny_nkat, tmp_path / "o", outtype="Q8_0")
    assert not (tmp_path / "t.gguf").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_output_dir(tiny_nkat: Path, tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable"):
            export_kobold(tiny_nkat, tmp_path)
    finally:
        tmp_path.chmod(0o700)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_export_and_its_errors(tiny_nkat: Path, tmp_path: Path) -> None:
    done = run_cli("export", "kobold", str(tiny_nkat), "--output-dir", str(tmp_path / "k"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"]["kcpps"] == str(tmp_path / "k" / "tiny.kcpps")

    bad_gamma = run_cli("export", "adapter", str(tiny_nkat), "--gamma", "abc", "-o", str(tmp_path / "t.gguf"))
    assert bad_gamma.returncode == 2 and "'abc' is not a number" in bad_gamma.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    unwritable = run_cli("export", "ollama", str(tiny_nkat), "--output-dir", str(blocker / "sub"))
    assert unwritable.returncode == 1 and unwritable.stderr.count("\n") == 1
    assert "cannot create output directory" in unwritable.stderr
    assert not (tmp_path / "t.gguf").exists()

