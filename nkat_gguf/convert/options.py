"""convert's options and report: what is asked, and what was done."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from nkat_gguf.math.limits import DEFAULT_TRAIN_LR, DEFAULT_TRAIN_STEPS, DEFAULT_TRAIN_TOKENS, ThetaCalib, ThetaTrain
from nkat_gguf.so8t import So8tOptions

DEFAULT_CALIB_MEMORY = "4GiB"  # the second moments of a whole 7B llama (6.4 GB) take two passes, the default model one

# The default convert (issue 19): the file the frontier run of BENCHMARKS.md "This session" measured best among
# those that meet θ's speed target, where its command, commit and conditions stand. `convert` with none of the
# options that choose weights, ranks or types applies the allocation budgets below (nkat_gguf/cli/convert.py).
DEFAULT_OUTTYPE = "IQ4_NL"
DEFAULT_THETA_RANK = 8
DEFAULT_THETA_WEIGHTS: tuple[str, ...] | None = None  # --selective-layers patterns; None: every attention/FFN weight
DEFAULT_BYTE_BUDGET: str | None = "3%"  # types and θ ranks allocated together within this over the base type's file
DEFAULT_OP_BUDGET = 15  # the most weights that carry θ (4 llama.cpp graph operations each); capped at the model's


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `nkat-gguf convert` is asked to do; the CLI and Python callers build the same object."""

    input: Path
    output: Path
    outtype: str = DEFAULT_OUTTYPE  # "same": the input's type
    reference: Path | None = None
    theta_rank: int = DEFAULT_THETA_RANK
    gamma: float = 0.97  # γ, stored in the file as NkatTheta.gamma
    selective_layers: list[str] | tuple[str, ...] | None = DEFAULT_THETA_WEIGHTS  # None: every attention/FFN weight
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
    theta_budget: str | None = None  # "2MiB" or "3%" of the quantized file: per-weight ranks (theta_rank unused)
    theta_max_weights: int | None = None  # with theta_budget: the most weights that carry theta (graph operations)
    tensor_types: tuple[tuple[str, str], ...] = ()  # (pattern as selective_layers, type): llama-quantize --tensor-type
    byte_budget: str | None = None  # "2MiB" or "3%" over the base type's file: per-weight types and θ ranks
    op_budget: int | None = None  # with byte_budget: the most weights that carry θ (0: types only); None: no cap
    # the measured default instead of the uniform rank: DEFAULT_BYTE_BUDGET and DEFAULT_OP_BUDGET (capped at the
    # weights the model has); what `convert` asks for when no option chooses weights, ranks or types
    default_allocation: bool = False
    calibrate_temperature: bool = False  # fit T on the calibration text (theta at γ) and store it
    # learned θ (convert/theta_train.py), trained from the closed-form fit on the first calibration windows; the
    # mode's default stays none until measurements choose one
    theta_train: ThetaTrain = "none"  # block: each block's output; model: KL of the next-token distributions
    theta_train_steps: int = DEFAULT_TRAIN_STEPS  # Adam steps (per block with block)
    theta_train_lr: float = DEFAULT_TRAIN_LR  # a fraction of each rank component's largest starting entry per step
    theta_train_tokens: int = DEFAULT_TRAIN_TOKENS  # whole windows of 512
    theta_train_seed: int = 0


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
