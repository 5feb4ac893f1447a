"""The search's files: one `convert` per base type at the largest rank, and one per byte-budget setting.

`convert` at the largest rank runs calibrate -> quantize (with the importance matrix) -> fit -> write.
Every smaller rank is a truncation of that fit: exact for an SVD, and exact for the stored INT8 factors
too, whose scales are per component. A θ-budget allocation is cut from the same fit (at most the largest
rank per weight), by the convert allocation's greedy over the stored components. A byte budget changes the
weights' types, so each setting is its own `convert --byte-budget` (the calibration is cached, not repeated).
Each file is kept in the output directory's work/ folder under a key of everything that determines it, so a
rerun (after a crash, or to extend the study) starts at the trials. The best model is written from its file
by the convert pipeline's own writer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
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
from nkat_gguf.math.limits import DEFAULT_THETA_WEIGHTS
from nkat_gguf.optimizer.options import NO_BUDGET, Build, ThetaConfig
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


def build_options(opts: ConvertOptions, build: Build, rank: int) -> ConvertOptions:
    """convert's options for one of the search's files: θ at `rank` on every weight, or the byte budget's
    allocation of types and ranks."""
    if build.byte_budget == NO_BUDGET:
        return replace(opts, outtype=build.outtype, theta_rank=rank, byte_budget=None, theta_weights=None)
    return replace(opts, outtype=build.outtype, theta_rank=None, byte_budget=build.byte_budget,
                   theta_weights=build.theta_weights)


def build_name(build: Build, rank: int, key: str) -> str:
    if build.byte_budget == NO_BUDGET:
        return f"theta_rank{rank}-{key}.nkat.gguf"
    weights = "default" if build.theta_weights is None else build.theta_weights
    return f"byte_budget{build.byte_budget.replace('%', 'pct')}_weights{weights}-{key}.nkat.gguf"


def search_base(opts: ConvertOptions, path: Path) -> Path:
    """The file `opts` converts to, built by `convert` unless it is already there (its name holds its key)."""
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        convert(replace(opts, output=path))
    return path


def remove_stale(work_dir: Path, keep: set[Path]) -> None:
    """Files in work/ this search would not build (other inputs or settings): never read again."""
    for stale in work_dir.glob("*.nkat.gguf") if work_dir.is_dir() else ():
        if stale not in keep:
            stale.unlink()


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


def theta_for(base: Path, full: NkatTheta | None, config: ThetaConfig, gamma: float,
              sensitivity: dict[str, float] | None) -> NkatTheta:
    """The theta a configuration applies, cut from its file's full theta (a byte budget's: all of it)."""
    full = full or NkatTheta(gamma, {})
    if config.byte_budget != NO_BUDGET:
        return replace(full, gamma=gamma) if config.theta_on else replace(full, gamma=gamma, tensors={})
    if config.theta_budget == NO_BUDGET or config.rank == 0:
        return theta_at_rank(full, config.rank, gamma)
    if sensitivity is None:
        raise ValueError("a budget configuration needs the per-kind sensitivity")
    budget = parse_budget(config.theta_budget, base.stat().st_size).bytes_for(quantized_bytes(base, full))
    weights = DEFAULT_THETA_WEIGHTS if config.theta_weights is None else config.theta_weights
    return reallocate(full, sensitivity, budget, min(weights, len(full.tensors)), config.rank, gamma)


def write_model(base: Path, config: ThetaConfig, gamma: float, dst: Path,
                sensitivity: dict[str, float] | None = None) -> Path:
    """The base's quantized tensors with theta cut to `config` at γ, written as convert writes (atomically)."""
    theta = theta_for(base, read_theta(base), config, gamma, sensitivity)
    write_with_metadata(base, dst, theta_metadata(theta), drop_prefixes=(PREFIX,))
    return dst


class SearchModel:
    """One of the search's files loaded in llama.cpp at a time: a trial on the loaded file only switches the
    adapter (configuration) and its scale (γ); one on another file (base type, byte budget) loads that first."""

    def __init__(self, files: Callable[[ThetaConfig], Path], first: ThetaConfig, options: RuntimeOptions):
        self.files, self.options = files, options
        self.sensitivity: dict[str, float] | None = None  # set by the study when it searches θ budgets
        self.base: Path | None = None
        self.load(first)

    def load(self, config: ThetaConfig) -> None:
        """The file `config` applies to, loaded unless it already is."""
        path = self.files(config)
        if path == self.base:
            return
        if self.base is not None:
            self.runtime.close()
        self.base, self.runtime = path, NkatRuntime(path, self.options)
        self.full = self.runtime.theta
        self.thetas: dict[str, NkatTheta] = {}

    def theta(self, config: ThetaConfig) -> NkatTheta:
        self.load(config)
        if config.key not in self.thetas:
            gamma = self.full.gamma if self.full else 1.0
            self.thetas[config.key] = theta_for(self.base, self.full, config, gamma, self.sensitivity)
        return self.thetas[config.key]

    def apply(self, config: ThetaConfig | int, gamma: float | None) -> None:
        """θ off (or an allocation that adapts no weight) removes the adapter; otherwise y = W x + γ·B·A·x with the
        configuration's ranks. The KV cache is reset."""
        config = config if isinstance(config, ThetaConfig) else ThetaConfig(config)
        if not config.theta_on or not self.theta(config).tensors:
            self.load(config)
            self.runtime.set_gamma(None)
        else:
            self.runtime.use_theta(self.theta(config), gamma)

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "SearchModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
