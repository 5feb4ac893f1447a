"""qwen2 through the product: a tiny synthetic qwen2 (q/k/v biases) converts with the default `convert`, its
biases pass through untouched, llama.cpp loads the result, and `perplexity --kld-reference` measures its KL
divergence from the input, with θ on and off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.format.tensors import TensorSource
from tools.synthetic_model import TINY, build_qwen2_gguf

ROOT = Path(__file__).resolve().parents[1]
CALIB_TOKENS = "1024"  # the default convert in every other respect; fewer calibration tokens keep it quick
# Mean KLD of the tiny qwen2's convert from its F32 input, 2 chunks of 512 of the evaluation text, measured:
# 0.0088 θ on, 0.0089 θ off (0.0043 θ on with the default 16,384 calibration tokens); the same file with its
# biases zeroed 0.20 (same top 14 %). The bound separates a file that kept its biases from one that lost them.
KLD_BOUND = 0.02


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen2_gguf(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2-f32.gguf", TINY)


@pytest.fixture(scope="module")
def converted(qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("qwen2-nkat") / "tiny-qwen2.nkat.gguf"
    proc = run_cli("convert", "--input", qwen2, "--output", out, "--calib-tokens", CALIB_TOKENS, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(proc.stdout)


def kld_of(model: Path, reference: Path, *extra: str) -> dict:
    proc = run_cli("perplexity", "-m", model, "--kld-reference", reference, "--chunks", "2", "--json", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)["kld"]


def test_default_convert_quantizes_the_weights_and_keeps_the_biases(qwen2: Path, converted: tuple[Path, dict]) -> None:
    out, report = converted
    before, after = TensorSource(qwen2), TensorSource(out)
    types = {t.name: t.type.name for t in after.layout.tensors}
    assert types.keys() == {t.name for t in before.layout.tensors}
    biases = [name for name in types if name.endswith(".bias")]
    assert len(biases) == 3 * TINY.n_layers
    for name in biases:  # copied as they were: F32, the same bytes
        assert types[name] == "F32"
        assert np.array_equal(after.dequantize(name), before.dequantize(name)), name
    matrices = [name for name in types if name.startswith("blk.") and name.endswith(".weight") and "norm" not in name]
    assert len(matrices) == 7 * TINY.n_layers and all(types[name] != "F32" for name in matrices)
    assert report["imatrix"] == "calibration" and report["calibration"] == "activation"


def test_converted_qwen2_loads_and_measures_kld_against_its_input(qwen2: Path, converted: tuple[Path, dict]) -> None:
    out, _ = converted
    on, off = kld_of(out, qwen2), kld_of(out, qwen2, "--no-theta")
    for kld in (on, off):
        assert kld["tokens"] == 2 * 255  # positions 256 … 510 of each chunk of 512
        assert 0 < kld["kld"] < KLD_BOUND and kld["same_top"] > 0.5
    assert on["kld"] != off["kld"]  # llama.cpp applies θ's adapter to the qwen2 weights
