"""convert's options and report: what is asked, and what was done."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nkat_gguf.math.limits import (
    DEFAULT_BYTE_BUDGET,
    DEFAULT_GAMMA,
    DEFAULT_OUTTYPE,
    DEFAULT_SPEED_PRICE,
    DEFAULT_THETA_RANK,
    DEFAULT_TRAIN_LR,
    DEFAULT_TRAIN_STEPS,
    DEFAULT_TRAIN_TOKENS,
    ThetaCalib,
    ThetaTrain,
)
from nkat_gguf.so8t import So8tOptions

UNQUANTIZED_OUTTYPES = ("F32", "F16", "BF16")  # outtypes that lose nothing: no types to allocate, no θ
DEFAULT_CALIB_MEMORY = "4GiB"  # the second moments of a whole 7B llama (6.4 GB) take two passes, the default model one


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `nkat-gguf convert` is asked to do; the CLI and Python callers build the same object, and
    `ConvertOptions(input, output)` writes the same file as `nkat-gguf convert` with no options: types and θ
    ranks allocated under DEFAULT_BYTE_BUDGET, θ on at most DEFAULT_THETA_WEIGHTS weights (math/limits.py)."""

    input: Path
    output: Path
    outtype: str = DEFAULT_OUTTYPE  # "same": the input's type
    reference: Path | None = None  # the reference weights θ aims at (default: the input's)
    theta_rank: int | None = None  # R: θ of rank R on every selected weight, no allocation (0: no θ); None: allocated
    gamma: float = DEFAULT_GAMMA  # γ, stored in the file as NkatTheta.gamma
    selective_layers: list[str] | tuple[str, ...] | None = None  # None: every attention/FFN weight
    calib_text: Path | None = None
    calib_memory: str = DEFAULT_CALIB_MEMORY  # Σxxᵀ held at once; above it, passes per group of layers
    max_memory: str | None = None  # refuse before any work a run whose formula peak exceeds it (convert/memory.py)
    calib_tokens: int | None = None  # None: DEFAULT_CALIB_TOKENS, or all whole windows of a shorter text
    save_imatrix: Path | None = None  # also write the calibration as a llama.cpp imatrix GGUF
    theta_calib: ThetaCalib = "activation"
    theta_fit: str = "whiten"  # "diag" or "whiten" (see theta_fit.py)
    theta_damping: float | None = None  # None: the fit's default
    theta_rounds: int = 1  # > 1: LoftQ-style joint requantization rounds
    imatrix: str = "auto"  # "auto": from the calibration; "none"; or a llama.cpp imatrix file
    threads: int = 0
    progress: bool = True
    so8t: So8tOptions = So8tOptions()  # no rotation unless asked for
    theta_budget: str | None = None  # "2MiB" or "3%" of the quantized file: θ ranks only, types stay the base's
    tensor_types: tuple[tuple[str, str], ...] = ()  # (pattern as selective_layers, type): llama-quantize --tensor-type
    # "2MiB" or "3%" over the base type's file: per-weight types and θ ranks; None: DEFAULT_BYTE_BUDGET unless
    # theta_rank or theta_budget is given (see resolved)
    byte_budget: str | None = None
    # under a budget, the most weights that carry θ (4 graph operations each); 0: θ on no weight (types only);
    # None: DEFAULT_THETA_WEIGHTS capped at the model's weights
    theta_weights: int | None = None
    # κ: a type change that makes the weights' products x % slower must lower their error by κ·x % of the base's
    # (the local CPU's per-type speed, engine/measure/type_speed.py); 0: by error per byte alone
    speed_price: float = DEFAULT_SPEED_PRICE
    calibrate_temperature: bool = False  # fit T on the calibration text (theta at γ) and store it
    # learned θ (convert/theta_train.py), trained from the closed-form fit on the first calibration windows; the
    # mode's default stays none until measurements choose one
    theta_train: ThetaTrain = "none"  # block: each block's output; model: KL of the next-token distributions
    theta_train_steps: int = DEFAULT_TRAIN_STEPS  # Adam steps (per block with block)
    theta_train_lr: float = DEFAULT_TRAIN_LR  # a fraction of each rank component's largest starting entry per step
    theta_train_tokens: int = DEFAULT_TRAIN_TOKENS  # whole windows of 512
    theta_train_seed: int = 0

    def resolved(self) -> ConvertOptions:
        """These options with convert's defaults filled in, the one place they are decided: the allocation of
        types and θ ranks under DEFAULT_BYTE_BUDGET unless a uniform `theta_rank` or a θ-only `theta_budget`
        is asked for, and for an unquantized outtype (F32, F16, BF16: `--so8t` rotations written at full
        precision) no θ and no allocation. `theta_weights` stays None (the default count is capped at the model's
        weights on read)."""
        if self.outtype.upper() in UNQUANTIZED_OUTTYPES:  # nothing is lost, so nothing to allocate or correct
            return replace(self, theta_rank=0 if self.theta_rank is None else self.theta_rank)
        by_hand = self.theta_rank is not None or self.theta_budget is not None
        return replace(self, theta_rank=DEFAULT_THETA_RANK if self.theta_rank is None else self.theta_rank,
                       byte_budget=self.byte_budget if self.byte_budget is not None or by_hand else DEFAULT_BYTE_BUDGET)


@dataclass
class ConvertReport:
    """What convert did and measured, for --json and the text summary."""

    input: str
    output: str
    outtype: str
    theta_rank: int
    gamma: float
    calibration: str  # "activation" or "none"
    theta_fit: str
    imatrix: str
    notes: list[str] = field(default_factory=list)
    input_bytes: int = 0
    output_bytes: int = 0
    theta_metadata_bytes: int = 0
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> {rank, captured_energy, ...}
    seconds: dict[str, float] = field(default_factory=dict)
    # the process's peak resident memory (getrusage ru_maxrss) when convert returned: convert's own peak when
    # the process did nothing heavier before it (the CLI), else an upper bound
    peak_resident_bytes: int = 0
    so8t: dict | None = None  # rotation and QC figures when --so8t baked one
    allocation: dict | None = None  # --theta-budget / --byte-budget: budget, bytes spent, sensitivity, ranks, types
    temperature: dict | None = None  # --calibrate-temperature: the fitted T and what it was fitted on
    types: dict[str, str] | None = None  # --byte-budget: weight -> the type it was upgraded to from the base
    fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> "q3_K -> q4_0", llama.cpp's substitutions
    theta_train: dict | None = None  # --theta-train: mode, seconds, initial/final loss, peak memory

    def as_dict(self) -> dict:
        return asdict(self)
