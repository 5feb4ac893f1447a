"""Choices, numeric ranges and convert's defaults that both a command's options and the library use, declared once.

The library's checks (`convert.theta_fit.check_fit`, `evaluate.longtext.plan_context`, for Python callers), its
defaults (`convert.options.ConvertOptions`) and the CLI's options read them from here. This module imports
nothing, so `nkat-gguf --help` shows them without loading the convert pipeline, numpy or llama.cpp.
"""

from __future__ import annotations

from typing import Literal, get_args

# The default convert (issue 19), the same for `ConvertOptions(input, output)`, `nkat-gguf convert` with no options,
# the base type of `quality` and `optimize`, and `frontier`'s default variant: the file the frontier run of
# BENCHMARKS.md "This session" measured best among those that meet θ's speed target, where its command, commit
# and conditions stand. Types and θ ranks are allocated together under the byte budget and the θ-weight count,
# unless a uniform --theta-rank or a θ-only --theta-budget is asked for (ConvertOptions.resolved).
DEFAULT_OUTTYPE = "IQ4_NL"
DEFAULT_BYTE_BUDGET = "3%"  # types and θ ranks allocated together within this over the base type's file
DEFAULT_THETA_WEIGHTS = 15  # the most weights that carry θ (4 llama.cpp graph operations each); capped at the model's
DEFAULT_THETA_RANK = 8  # where one rank is needed and none is given (quality's θ rows); budgets choose per weight
DEFAULT_GAMMA = 0.97  # γ stored in the file

# θ fit (convert --theta-calib, --theta-fit, --theta-damping, --theta-rounds)
ThetaCalib = Literal["activation", "none"]  # activation: SVD weighted by each weight's inputs; none: plain SVD
THETA_CALIBS: tuple[ThetaCalib, ...] = get_args(ThetaCalib)
FitMethod = Literal["diag", "whiten"]
FIT_METHODS: tuple[FitMethod, ...] = get_args(FitMethod)
DAMPING_RANGE: tuple[float, float] = (0, 10)  # the fit's damping, a fraction of the mean of E[x²]
ROUNDS_RANGE: tuple[int, int] = (1, 10)  # LoftQ-style joint rounds in all; 1: θ on llama.cpp's own quantization

# learned θ (convert --theta-train, --theta-train-steps, --theta-train-lr, --theta-train-tokens)
ThetaTrain = Literal["none", "block", "model"]  # block: each block's output; model: KL of the next-token distribution
THETA_TRAINS: tuple[ThetaTrain, ...] = get_args(ThetaTrain)
TRAIN_STEPS_RANGE: tuple[int, int] = (1, 100_000)  # Adam steps (per block with block)
TRAIN_LR_RANGE: tuple[float, float] = (1e-6, 1.0)  # Adam's step, a fraction of each component's largest entry
TRAIN_TOKENS_RANGE: tuple[int, int] = (512, 1 << 20)  # calibration tokens trained on, in whole windows of 512
# their defaults (ConvertOptions and the CLI read them here); the mode's stays none until measured
DEFAULT_TRAIN_STEPS, DEFAULT_TRAIN_LR, DEFAULT_TRAIN_TOKENS = 50, 2e-3, 2048

# confidence (qc confidence, convert --calibrate-temperature): the temperature's search interval
TEMPERATURE_RANGE: tuple[float, float] = (0.5, 3.0)

# long-text QC (qc longtext --tokens)
DROP_WINDOW = 32  # tokens of the trailing mean in an abnormal entropy drop
MIN_LONGTEXT_TOKENS = 2 * DROP_WINDOW  # below this the drop window and the drift slope say little

# perplexity and KLD contexts (--ctx): below this a chunk scores too few tokens for a meaningful mean and error
MIN_N_CTX = 16

# convert --speed-price: κ of the allocation's speed price (0: types chosen by error per byte alone). Off by default:
# the probe's per-type seconds (engine/measure/type_speed.py) measured on a loaded 2-core machine spread 50× between
# types of equal kernels, and a price from noise made the default model's default file 2.6× worse in KLD
# (BENCHMARKS.md, "Types chosen, not fixed").
DEFAULT_SPEED_PRICE = 0.0
