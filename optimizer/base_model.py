"""The search's one-off work: quantize once, fit theta once at the largest rank, load the model once.

`convert` at the largest rank runs calibrate -> quantize (with the importance matrix) -> fit -> write.
Every smaller rank is a truncation of that fit: exact for an SVD, and exact for the stored INT8 factors
too, whose scales are per component. The file is kept in the output directory's work/ folder under a
key of everything that determines it, so a rerun (after a crash, or to extend the study) starts at the
trials. The best model is written from it by the convert pipeline's own writer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from nkat_gguf import __version__
from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.engine.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import write_with_metadata
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.format.nkat import NkatTheta, read_theta, theta_metadata
from nkat_gguf.texts import Text

WORK_DIR = "work"


# Options that do not change the base, or whose file paths stand in for contents hashed separately
# (so workers on machines with other paths agree).
NOT_IN_KEY = ("input", "output", "reference", "calib_text", "imatrix", "theta_rank", "theta_gamma", "threads",
              "progress")


def base_key(opts: ConvertOptions, rank: int, input_sha256: str, calibration: Text) -> str:
    """A short hash of every input the base model depends on: convert's options and the files' contents."""
    options = {k: v for k, v in asdict(opts).items() if k not in NOT_IN_KEY}
    files = {"input": input_sha256, "calibration": calibration.sha256,
             "reference": sha256_file(Path(opts.reference)) if opts.reference else None,
             "imatrix": opts.imatrix if opts.imatrix in ("auto", "none") else sha256_file(Path(opts.imatrix))}
    parts = {"options": options, "files": files, "rank": rank, "version": __version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def search_base(opts: ConvertOptions, rank: int, work_dir: Path, key: str) -> Path:
    """The quantized model with theta at `rank`, built by `convert` unless this key's file is already there."""
    path = work_dir / f"theta_rank{rank}-{key}.nkat.gguf"
    if path.exists():
        return path
    work_dir.mkdir(exist_ok=True)
    for stale in work_dir.glob("theta_rank*.nkat.gguf"):  # built from other inputs: never read again
        stale.unlink()
    convert(replace(opts, output=path, theta_rank=rank))
    return path


def theta_at_rank(theta: NkatTheta, rank: int, gamma: float) -> NkatTheta:
    """theta's leading `rank` components with default scale γ; rank 0 is no theta at all."""
    return replace(theta, rank=rank, gamma=gamma, tensors={n: t.truncate(rank) for n, t in theta.tensors.items()}
                   if rank > 0 else {})


def write_model(base: Path, rank: int, gamma: float, dst: Path) -> Path:
    """The base's quantized tensors with theta cut to `rank` at γ, written as convert writes (atomically)."""
    theta = theta_at_rank(read_theta(base), rank, gamma)
    write_with_metadata(base, dst, theta_metadata(theta), drop_prefixes=(nkat.PREFIX,))
    return dst


class SearchModel:
    """The base loaded once in llama.cpp; a trial only switches the adapter (rank) and its scale (γ)."""

    def __init__(self, base: Path, ranks: tuple[int, ...], options: RuntimeOptions):
        self.runtime = NkatRuntime(base, options)
        full = self.runtime.theta
        self.thetas = {r: theta_at_rank(full, r, full.gamma) for r in ranks}

    def apply(self, rank: int, gamma: float | None) -> None:
        """Rank 0 is theta off; otherwise y = W x + γ·B_r·A_r·x. The KV cache is reset either way."""
        if rank == 0:
            self.runtime.set_gamma(None)
        else:
            self.runtime.use_theta(self.thetas[rank], gamma)

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "SearchModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
