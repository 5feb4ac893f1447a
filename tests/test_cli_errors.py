"""Bad input through the real command line: one line on stderr, exit code != 0, no output, input untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from nkat_gguf.format.gguf_file import write_with_metadata


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *args], capture_output=True, text=True,
                          timeout=300)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bad_inputs(tiny_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    text = d / "notes.gguf"
    text.write_text("plain text, not a model\n" * 20)
    truncated = d / "truncated.gguf"
    truncated.write_bytes(tiny_f32.read_bytes()[: tiny_f32.stat().st_size // 2])
    alien = d / "alien.gguf"
    write_with_metadata(tiny_f32, alien, {"general.architecture": "nkat-unknown-arch"})
    return {"missing": d / "missing.gguf", "not_gguf": text, "truncated": truncated, "alien": alien}


@pytest.mark.parametrize("case, extra, message", [
    ("missing", [], "no such file"),
    ("not_gguf", [], "not a GGUF file"),
    ("truncated", [], "truncated GGUF"),
    ("alien", [], "llama.cpp cannot load"),
    ("tiny", ["--theta-rank", "1000"], "larger than"),
    ("tiny", ["--theta-gamma", "-0.5"], "--theta-gamma"),
    ("tiny", ["--theta-gamma", "abc"], "not a number"),
    ("tiny", ["--outtype", "Q9_9"], "unknown --outtype"),
    ("tiny", ["--selective-layers", "blk.99.nothing"], "matches no"),
    ("tiny", ["--theta-budget", "-1MiB"], "is negative"),
    ("tiny", ["--theta-budget", "0MiB"], "allows no theta"),
    ("tiny", ["--theta-budget", "0%"], "allows no theta"),
    ("tiny", ["--theta-budget", "2MB"], "not a size"),
    ("tiny", ["--theta-budget", "1000MiB"], "larger than the model"),
    ("tiny", ["--theta-budget", "101%"], "larger than the model"),
    ("tiny", ["--theta-budget", "1%", "--theta-weights", "0"], "--theta-weights 0 allows it on no weight"),
    ("tiny", ["--theta-budget", "1%", "--theta-weights", "15"], "14 weights"),
    ("tiny", ["--theta-weights", "3"], "caps a budget's allocation"),
    ("tiny", ["--theta-max-weights", "3"], "caps a budget's allocation"),  # old spellings: the same option
    ("tiny", ["--byte-budget", "3%", "--op-budget", "15"], "14 weights"),
    ("tiny", ["--theta-budget", "1%", "--theta-rank", "0"], "--theta-rank 0"),
])
def test_convert_refuses_bad_input_in_one_line(case: str, extra: list[str], message: str, tiny_f32: Path,
                                               bad_inputs: dict[str, Path], tmp_path: Path) -> None:
    source = tiny_f32 if case == "tiny" else bad_inputs[case]
    before = digest(source) if source.exists() else None
    out = tmp_path / "out.nkat.gguf"
    proc = run_cli("convert", "--input", str(source), "--output", str(out), "--theta-rank", "2", *extra)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial or temporary file left
    if before is not None:
        assert digest(source) == before


@pytest.mark.parametrize("output", ["/proc/nkat-test.nkat.gguf", "/nonexistent-dir/x.nkat.gguf"])
def test_unwritable_output_is_refused_before_any_work(output: str, tiny_f32: Path) -> None:
    proc = run_cli("convert", "--input", str(tiny_f32), "--output", output)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "output directory" in lines[0], proc.stderr


def test_engine_commands_refuse_bad_gamma_and_models(tiny_f32: Path, bad_inputs: dict[str, Path]) -> None:
    for args, message in ((["perplexity", "-m", str(bad_inputs["not_gguf"])], "not a GGUF"),
                          (["bench", "-m", str(tiny_f32), "--gamma", "nan"], "--gamma"),
                          (["perplexity", "-m", str(tiny_f32), "--gamma", "1"], "carries no theta"),
                          (["compare", "-m", str(tiny_f32)], "carries no theta")):
        proc = run_cli(*args)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert lines and message in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
