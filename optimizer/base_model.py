"""The search's one-off work: quantize once, fit theta once at the largest rank, load the model once.

`convert` at the largest rank runs calibrate -> quantize (with the importance matrix) -> fit -> write.
Every smaller rank is a truncation of that fit: exact for an SVD, and exact for the stored INT8 factors
too, whose scales are per component. A budget allocation is cut from the same fit (at most the largest
rank per weight), by the convert allocation's greedy over the stored components. The file is kept in the output directory's work/ folder under a
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
from nkat_gguf.convert.allocate import reallocate
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.format.gguf_file import write_with_metadata
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.format.nkat import PREFIX, NkatTheta, component_bytes, listing_bytes, read_theta, theta_metadata
from nkat_gguf.math.allocation import parse_budget
from nkat_gguf.optimizer.options import ALL_WEIGHTS, NO_BUDGET, ThetaConfig
from nkat_gguf.texts import Text

WORK_DIR = "work"
SENSITIVITY_ATTR = "kind_sensitivity"  # study attribute: weight kind -> sensitivity, for budget configurations


# Options that do not change the base, or whose file paths stand in for contents hashed separately
# (so workers on machines with other paths agree).
NOT_IN_KEY = ("input", "output", "reference", "calib_text", "imatrix", "theta_rank", "gamma", "threads",
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
    """theta's leading `rank` components per weight (fewer where a weight has fewer) with default scale γ;
    rank 0 is no theta at all."""
    return replace(theta, gamma=gamma, tensors={n: t.truncate(min(rank, t.rank)) for n, t in theta.tensors.items()}
                   if rank > 0 else {})


def quantized_bytes(base: Path, theta: NkatTheta) -> int:
    """The base file's size without its theta's per-weight keys: what a % budget is a share of."""
    shapes = {n: (t.b.shape[0], t.a.shape[1]) for n, t in theta.tensors.items()}
    return base.stat().st_size - sum(listing_bytes(n) + t.rank * component_bytes(*shapes[n])
                                     for n, t in theta.tensors.items())


def theta_for(base: Path, full: NkatTheta, config: ThetaConfig, gamma: float,
              sensitivity: dict[str, float] | None) -> NkatTheta:
    """The theta a configuration applies, cut from the base's full theta."""
    if config.budget == NO_BUDGET or config.rank == 0:
        return theta_at_rank(full, config.rank, gamma)
    if sensitivity is None:
        raise ValueError("a budget configuration needs the per-kind sensitivity")
    budget = parse_budget(config.budget, base.stat().st_size).bytes_for(quantized_bytes(base, full))
    return reallocate(full, sensitivity, budget, config.max_weights if config.max_weights != ALL_WEIGHTS else None,
                      config.rank, gamma)


def write_model(base: Path, config: ThetaConfig, gamma: float, dst: Path,
                sensitivity: dict[str, float] | None = None) -> Path:
    """The base's quantized tensors with theta cut to `config` at γ, written as convert writes (atomically)."""
    theta = theta_for(base, read_theta(base), config, gamma, sensitivity)
    write_with_metadata(base, dst, theta_metadata(theta), drop_prefixes=(PREFIX,))
    return dst


class SearchModel:
    """The base loaded once in llama.cpp; a trial only switches the adapter (configuration) and its scale (γ)."""

    def __init__(self, base: Path, ranks: tuple[int, ...], options: RuntimeOptions):
        self.base = base
        self.runtime = NkatRuntime(base, options)
        self.full = self.runtime.theta
        self.sensitivity: dict[str, float] | None = None  # set by the study when it searches budgets
        self.thetas = {str(r): theta_at_rank(self.full, r, self.full.gamma) for r in ranks}

    def theta(self, config: ThetaConfig) -> NkatTheta:
        if config.key not in self.thetas:
            self.thetas[config.key] = theta_for(self.base, self.full, config, self.full.gamma, self.sensitivity)
        return self.thetas[config.key]

    def apply(self, config: ThetaConfig | int, gamma: float | None) -> None:
        """Rank 0 (or an allocation that adapts no weight) is theta off; otherwise y = W x + γ·B·A·x with the
        configuration's ranks. The KV cache is reset."""
        config = config if isinstance(config, ThetaConfig) else ThetaConfig(config)
        if config.rank == 0 or not self.theta(config).tensors:
            self.runtime.set_gamma(None)
        else:
            self.runtime.use_theta(self.theta(config), gamma)

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "SearchModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
