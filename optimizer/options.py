"""What a search is asked to do, checked before any work: each bad value is one InputError line."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from nkat_gguf.convert import ConvertOptions
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.format.nkat import MAX_GAMMA
from nkat_gguf.math.limits import DEFAULT_BYTE_BUDGET, DEFAULT_GAMMA, DEFAULT_OUTTYPE, DEFAULT_THETA_WEIGHTS, MIN_N_CTX

MODES = {"quick": 12, "full": 100}  # "custom" takes --trials
DEFAULT_RANKS = (2, 4, 6, 8)  # the seed's table
DEFAULT_GAMMA_RANGE = (0.90, 0.99)  # the seed's range
SEED_POINT = (4, 0.97)  # the seed's recommended rank and γ, tried right after the baseline
DEFAULT_STUDY_NAME = "nkat-optimize"
NO_BUDGET = "none"  # a budget choice meaning none: one rank on every weight, the base type's types


@dataclass(frozen=True)
class OptimizeOptions:
    """A search over convert's knobs and γ. `convert` says how to build the model (its output, rank, base type and
    budgets are set here, per trial)."""

    convert: ConvertOptions
    output_dir: Path
    mode: str = "quick"
    trials: int | None = None  # only with mode "custom"
    ranks: tuple[int, ...] = DEFAULT_RANKS
    gamma_range: tuple[float, float] = DEFAULT_GAMMA_RANGE
    pareto: bool = False  # minimise (ppl, slowdown) and report the Pareto front instead of one score
    storage: str | None = None  # an RDB URL; default: SQLite in output_dir
    study_name: str = DEFAULT_STUDY_NAME
    seed: int = 0
    n_ctx: int = 512  # tokens per perplexity chunk
    chunks: int = 4  # calibration-split chunks per trial
    eval_chunks: int = 8  # evaluation-split chunks of the final comparison
    eval_text: Path | None = None  # default: the built-in evaluation split
    speed_repetitions: int = 3
    n_gen: int = 64  # generated tokens per speed repetition of each rank
    outtypes: tuple[str, ...] = ()  # base types to try; (): convert.outtype alone
    byte_budgets: tuple[str, ...] = ()  # types and θ ranks allocated together (convert --byte-budget), one file each
    theta_budgets: tuple[str, ...] = ()  # θ ranks only (convert --theta-budget), cut from the uniform base's θ
    theta_weights: tuple[int, ...] = ()  # under a budget, the θ-weight counts to try; (): convert's default
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    best_model: Path | None = None  # default: optimal_rank{r}_gamma{g}.nkat.gguf in output_dir
    progress: bool = True

    @property
    def base_types(self) -> tuple[str, ...]:
        return self.outtypes or (self.convert.outtype,)


def parse_ranks(text: str) -> tuple[int, ...]:
    """"2,4,6,8" -> (2, 4, 6, 8), sorted and without repeats."""
    try:
        ranks = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise InputError(f"--ranks must be comma-separated whole numbers, got {text!r}") from None
    return tuple(sorted(ranks))


def parse_list(text: str) -> tuple[str, ...]:
    """"1MiB, 3%" -> ("1MiB", "3%"): budgets or types, in order, without repeats; each is checked by its owner."""
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def parse_counts(text: str) -> tuple[int, ...]:
    """"15,30" -> (15, 30), sorted and without repeats (--theta-weights)."""
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise InputError(f"--theta-weights must be comma-separated whole numbers, got {text!r}") from None


@dataclass(frozen=True)
class Build:
    """One file the search converts: the base type, and convert's byte budget with its θ-weight count (None: the
    default), or NO_BUDGET: θ at the search's largest rank on every weight, which smaller ranks truncate."""

    outtype: str
    byte_budget: str = NO_BUDGET
    theta_weights: int | None = None


@dataclass(frozen=True)
class ThetaConfig:
    """What a trial applies, on `outtype` (None: the study's first base type).

    Without a byte budget: θ at `rank` on every weight, or the allocation of `theta_budget` (θ ranks only) over
    at most `theta_weights` weights with no weight above `rank`; rank 0 is θ off. With a byte budget: the file
    convert writes with it (types and ranks allocated, θ on at most `theta_weights` weights, 0: types only),
    its θ as allocated."""

    rank: int
    theta_budget: str = NO_BUDGET
    theta_weights: int | None = None  # None: convert's default (DEFAULT_THETA_WEIGHTS capped at the model's)
    outtype: str | None = None
    byte_budget: str = NO_BUDGET

    @property
    def key(self) -> str:
        parts = [str(self.rank)] if self.byte_budget == NO_BUDGET else [f"bytes={self.byte_budget}"]
        if self.theta_budget != NO_BUDGET:
            parts.append(self.theta_budget)
        if self.theta_budget != NO_BUDGET or self.byte_budget != NO_BUDGET:
            parts.append(f"weights={'default' if self.theta_weights is None else self.theta_weights}")
        return "|".join(parts + ([self.outtype] if self.outtype else []))

    @property
    def theta_on(self) -> bool:
        return self.rank > 0 if self.byte_budget == NO_BUDGET else self.theta_weights != 0

    def build(self, base_types: tuple[str, ...]) -> Build:
        outtype = self.outtype or base_types[0]
        return Build(outtype) if self.byte_budget == NO_BUDGET else Build(outtype, self.byte_budget, self.theta_weights)

    def off(self) -> "ThetaConfig":
        """The same file with θ off."""
        return ThetaConfig(0, outtype=self.outtype, byte_budget=self.byte_budget, theta_weights=self.theta_weights) \
            if self.byte_budget != NO_BUDGET else ThetaConfig(0, outtype=self.outtype)

    @classmethod
    def from_params(cls, params: dict) -> "ThetaConfig":
        return cls(params.get("rank", 0), params.get("theta_budget", NO_BUDGET), params.get("theta_weights"),
                   params.get("outtype"), params.get("byte_budget", NO_BUDGET))


def parse_gamma_range(text: str) -> tuple[float, float]:
    """"0.90,0.99" -> (0.90, 0.99); checked by check_options."""
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise InputError(f"--gamma-range must be two numbers LOW,HIGH, got {text!r}") from None
    return low, high


def total_trials(mode: str, trials: int | None) -> int:
    """The number of finished trials the study should reach."""
    if mode not in (*MODES, "custom"):
        raise InputError(f"unknown --mode {mode!r}; choose quick ({MODES['quick']} trials), "
                         f"full ({MODES['full']}) or custom --trials N")
    if mode != "custom":
        if trials is not None:
            raise InputError(f"--trials is for --mode custom; --mode {mode} runs {MODES[mode]} trials")
        return MODES[mode]
    if trials is None:
        raise InputError("--mode custom needs --trials N")
    if trials < 1:
        raise InputError(f"--trials must be at least 1, got {trials}")
    return trials


def check_options(opts: OptimizeOptions) -> int:
    """Refuse bad values before anything is loaded; returns the number of trials to reach."""
    total = total_trials(opts.mode, opts.trials)
    if not opts.ranks:
        raise InputError("--ranks is empty; give at least one rank, e.g. 2,4,6,8")
    if min(opts.ranks) < 1:
        raise InputError(f"--ranks must be >= 1, got {min(opts.ranks)} (rank 0, theta off, is always tried)")
    low, high = opts.gamma_range
    for gamma in (low, high):
        if math.isnan(gamma) or not 0 <= gamma <= MAX_GAMMA:
            raise InputError(f"--gamma-range values must be in [0, {MAX_GAMMA:g}], got {gamma}")
    if low > high:
        raise InputError(f"--gamma-range {low},{high} is inverted; give LOW,HIGH")
    if opts.n_ctx < MIN_N_CTX:
        raise InputError(f"--ctx must be at least {MIN_N_CTX}, got {opts.n_ctx}")
    for name, value in (("--chunks", opts.chunks), ("--eval-chunks", opts.eval_chunks),
                        ("--speed-repetitions", opts.speed_repetitions), ("--n-gen", opts.n_gen)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if opts.theta_weights and not (opts.theta_budgets or opts.byte_budgets):
        raise InputError("--theta-weights needs --byte-budget or --theta-budget (it caps how many weights a budget "
                         "gives theta)")
    if opts.theta_weights and min(opts.theta_weights) < 0:
        raise InputError(f"--theta-weights must be >= 0, got {min(opts.theta_weights)}")
    if not opts.study_name:
        raise InputError("--study-name is empty")
    return total


def rank_choices(ranks: tuple[int, ...]) -> list[int]:
    """The rank parameter's values: 0 (theta off, the baseline) and the requested ranks."""
    return [0, *ranks]


def seed_point(ranks: tuple[int, ...], gamma_range: tuple[float, float]) -> tuple[int, float]:
    """The seed's point (rank 4, γ 0.97), moved to the nearest point of a narrower space."""
    rank = min(ranks, key=lambda r: (abs(r - SEED_POINT[0]), r))
    return rank, min(max(SEED_POINT[1], gamma_range[0]), gamma_range[1])


def default_point(opts: OptimizeOptions) -> dict | None:
    """convert's default (DEFAULT_OUTTYPE, DEFAULT_BYTE_BUDGET, DEFAULT_THETA_WEIGHTS, DEFAULT_GAMMA) as trial
    parameters, when the search space holds it; None when it does not."""
    if DEFAULT_BYTE_BUDGET not in opts.byte_budgets or DEFAULT_OUTTYPE not in opts.base_types:
        return None
    if opts.theta_weights and DEFAULT_THETA_WEIGHTS not in opts.theta_weights:
        return None
    low, high = opts.gamma_range
    return ({"outtype": DEFAULT_OUTTYPE} if len(opts.base_types) > 1 else {}) | {"byte_budget": DEFAULT_BYTE_BUDGET} \
        | ({"theta_weights": DEFAULT_THETA_WEIGHTS} if opts.theta_weights else {}) \
        | {"gamma": min(max(DEFAULT_GAMMA, low), high)}
