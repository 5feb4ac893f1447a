"""What a search is asked to do, checked before any work: each bad value is one InputError line."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from nkat_gguf.convert import ConvertOptions
from nkat_gguf.math.limits import MIN_N_CTX
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.format.nkat import MAX_GAMMA

MODES = {"quick": 12, "full": 100}  # "custom" takes --trials
DEFAULT_RANKS = (2, 4, 6, 8)  # the seed's table
DEFAULT_GAMMA_RANGE = (0.90, 0.99)  # the seed's range
SEED_POINT = (4, 0.97)  # the seed's recommended rank and γ, tried right after the baseline
DEFAULT_STUDY_NAME = "nkat-optimize"
NO_BUDGET = "none"  # the budget choice meaning uniform rank on every weight
ALL_WEIGHTS = 0  # the max-weights choice meaning no operation budget


@dataclass(frozen=True)
class OptimizeOptions:
    """A search over theta rank and γ. `convert` says how to build the model (its output and rank are set here)."""

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
    budgets: tuple[str, ...] = ()  # theta byte budgets to try (MiB or % of the quantized file); () = uniform rank
    max_weights: tuple[int, ...] = ()  # operation budgets to try with a budget (besides every weight)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    best_model: Path | None = None  # default: optimal_rank{r}_gamma{g}.nkat.gguf in output_dir
    progress: bool = True


def parse_ranks(text: str) -> tuple[int, ...]:
    """"2,4,6,8" -> (2, 4, 6, 8), sorted and without repeats."""
    try:
        ranks = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise InputError(f"--ranks must be comma-separated whole numbers, got {text!r}") from None
    return tuple(sorted(ranks))


def parse_budgets(text: str) -> tuple[str, ...]:
    """"1MiB, 3%" -> ("1MiB", "3%"); each is checked against the model by allocation.parse_budget."""
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def parse_max_weights(text: str) -> tuple[int, ...]:
    """"30,60" -> (30, 60), sorted and without repeats."""
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise InputError(f"--max-weights must be comma-separated whole numbers, got {text!r}") from None


@dataclass(frozen=True)
class ThetaConfig:
    """What a trial applies: theta at `rank` on every weight, or (with a budget) the allocation of `budget`
    over at most `max_weights` weights (ALL_WEIGHTS: no cap) with no weight above `rank`. Rank 0 is theta off."""

    rank: int
    budget: str = NO_BUDGET
    max_weights: int = ALL_WEIGHTS

    @property
    def key(self) -> str:
        return str(self.rank) if self.budget == NO_BUDGET else f"{self.rank}|{self.budget}|{self.max_weights}"

    @classmethod
    def from_params(cls, params: dict) -> "ThetaConfig":
        return cls(params["rank"], params.get("budget", NO_BUDGET), params.get("max_weights", ALL_WEIGHTS))


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
    if opts.max_weights and not opts.budgets:
        raise InputError("--max-weights needs --budgets (it caps how many weights a budget spreads over)")
    if opts.max_weights and min(opts.max_weights) < 1:
        raise InputError(f"--max-weights must be >= 1, got {min(opts.max_weights)}")
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
