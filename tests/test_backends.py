"""The backend selector on this machine (only llama-cpp-python), with stand-in binaries, and `doctor`."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from nkat_gguf.backends import detect, format_backends, launch, nkat_command, resolve_target
from nkat_gguf.doctor import FAIL, OK, run_checks
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout

FAKE = """#!/bin/sh
if [ "$1" = "--version" ]; then printf '%s\\n' {version}; exit 0; fi
printf '%s\\n' "$@" > "$NKAT_FAKE_ARGS"
"""


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH with nothing on it: the machine as if only llama-cpp-python were installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def fake_binary(bin_dir: Path, name: str, *version_lines: str) -> Path:
    """A shell script (builtins only: PATH is empty) that answers --version and records its arguments."""
    path = bin_dir / name
    path.write_text(FAKE.format(version=" ".join(shlex.quote(line) for line in version_lines)))
    path.chmod(0o755)
    return path


def test_only_llama_cpp_python(tiny_nkat: Path, empty_path: Path) -> None:
    target = resolve_target(tiny_nkat, None)
    backends = {b.name: b for b in detect(target)}
    assert list(backends) == ["llama-cpp-python", "llama-cli", "llama-server", "koboldcpp", "ollama"]
    python = backends.pop("llama-cpp-python")
    assert python.installed and python.version == llama_cpp.__version__ and python.detail.startswith("adapter API: yes")
    assert python.commands == [nkat_command() + ["serve", str(tiny_nkat.resolve()), "--gamma", "0.97"]]
    assert all(not b.installed and not b.commands for b in backends.values())

    text = format_backends(list(detect(target)), target)
    assert text.splitlines()[0] == "commands run tiny.nkat.gguf with theta at gamma 0.97:"
    assert f"llama-cpp-python  {llama_cpp.__version__}" in text and text.count("not installed") == 4
    with pytest.raises(InputError, match="ollama is not installed"):
        launch(detect(target), "ollama")


def test_stand_in_binaries_are_found_and_launched(tiny_nkat: Path, empty_path: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake_binary(empty_path, "llama-cli", "version: 4242 (deadbeef)")
    fake_binary(empty_path, "ollama", "Warning: could not connect to a running Ollama instance",
                "Warning: client version is 0.9.9")
    target = resolve_target(tiny_nkat, 0.5, exports=tmp_path / "exports")
    backends = {b.name: b for b in detect(target)}
    assert backends["llama-cli"].version == "version: 4242 (deadbeef)"
    assert backends["ollama"].version == "Warning: client version is 0.9.9"
    ollama_run = backends["ollama"].commands
    assert [c[1:] for c in ollama_run[1:]] == [["create", "tiny", "-f", str(tmp_path / "exports/ollama/Modelfile")],
                                               ["run", "tiny"]]

    args_file = tmp_path / "args.txt"
    monkeypatch.setenv("NKAT_FAKE_ARGS", str(args_file))
    assert launch(list(backends.values()), "llama-cli") == 0
    adapter = tmp_path / "exports/llama-cli/tiny.theta-g0.5.gguf"
    assert args_file.read_text().split("\n")[:-1] == ["-m", str(tiny_nkat.resolve()), "--lora", str(adapter)]
    assert read_layout(adapter).get("general.type") == "adapter"  # written by the export step of the launch


def test_model_without_theta(tiny_f32: Path, empty_path: Path) -> None:
    target = resolve_target(tiny_f32, None)
    assert target.gamma is None
    python = detect(target)[0]
    assert python.commands == [nkat_command() + ["serve", str(tiny_f32.resolve())]]
    assert "without theta" in format_backends([python], target)


def test_cli_backends(tiny_nkat: Path) -> None:
    run = [sys.executable, "-m", "nkat_gguf.cli", "backends", str(tiny_nkat)]
    done = subprocess.run(run + ["--json"], capture_output=True, text=True, timeout=120)
    out = json.loads(done.stdout)
    assert done.returncode == 0 and out["gamma"] == 0.97 and out["backends"][0]["name"] == "llama-cpp-python"
    unknown = subprocess.run(run + ["--launch", "nosuch"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 1 and "unknown backend 'nosuch'" in unknown.stderr
    bad_gamma = subprocess.run(run + ["--gamma", "x"], capture_output=True, text=True, timeout=120)
    assert bad_gamma.returncode == 2 and "not a number" in bad_gamma.stderr


def test_doctor_on_this_machine() -> None:
    checks = {c.name: c for c in run_checks()}
    assert all(c.status != FAIL for c in checks.values()), [c for c in checks.values() if c.status == FAIL]
    assert checks["llama-cpp-python"].detail == llama_cpp.__version__
    assert checks["adapter API"].status == OK and checks["cache"].status == OK
    assert "llama-cpp-python" in checks["runtimes"].detail


def test_doctor_says_what_to_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    env = {**os.environ, "NKAT_CACHE_DIR": str(blocker)}
    done = subprocess.run([sys.executable, "-m", "nkat_gguf.cli", "doctor"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 1
    assert "fail  cache" in done.stdout and "fix: set NKAT_CACHE_DIR to a writable directory" in done.stdout
