"""convert's θ step under `--theta-budget`: fit every weight at the largest rank, measure, allocate, cut.

Each selected weight's residual is fitted once at up to ALLOCATION_MAX_RANK components, by the same fit
as a uniform rank (`theta_fit.ThetaFitter`: whitened or diagonal), and the energy of each component taken
(‖B[:, k]‖² = σ_k², since B = U_r·Σ_r); the per-kind sensitivity is measured on the calibration text; the global greedy
(`allocation.allocate`) chooses the ranks; every fit is truncated to its rank (exact for an SVD).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from tqdm import tqdm

from nkat_gguf.convert.calibrate import Calibration
from nkat_gguf.convert.candidates import candidate_errors, diagonal_error
from nkat_gguf.convert.sensitivity import kind_sensitivity
from nkat_gguf.convert.theta_fit import FitSettings, ThetaFitter, WeightFit
from nkat_gguf.engine.llama.quantize import accepted_types, check_types, quantize_model
from nkat_gguf.engine.measure.type_speed import type_seconds
from nkat_gguf.format.gguf_file import TensorSpec
from nkat_gguf.format.nkat import NkatTheta, component_bytes, listing_bytes, type_listing_bytes
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.allocation import (
    KINDS,
    Choice,
    ThetaBudget,
    TypeStep,
    WeightCosts,
    WeightSteps,
    allocate,
    allocation_bytes,
    mix_bytes,
    weight_kind,
)
from nkat_gguf.math.allocation import allocate_mix as allocate_mix_math
from nkat_gguf.math.limits import DEFAULT_SPEED_PRICE
from nkat_gguf.math.theta import LowRank, quantize_int8
from nkat_gguf.texts import Text
from nkat_gguf.timing import StepTimes

ALLOCATION_MAX_RANK = 64  # the most components one weight can get under a budget


@dataclass(frozen=True)
class Allocation:
    fits: dict[str, WeightFit]  # allocated weights only: factors at their rank, captured energy
    budget_bytes: int
    spent_bytes: int
    max_weights: int | None
    sensitivity: dict[str, dict[str, float | None]]  # kind -> nll_drop, energy (None: not measured), sensitivity
    seconds: dict[str, float] = field(default_factory=dict)  # the θ step's own steps, for convert's report

    def summary(self) -> dict:
        ranks = {n: f.theta.rank for n, f in self.fits.items()}
        by_kind = {k: sorted(r for n, r in ranks.items() if weight_kind(n) == k) for k in KINDS}
        return {"method": "budget", "budget_bytes": self.budget_bytes, "spent_bytes": self.spent_bytes,
                "max_weights": self.max_weights, "weights": len(ranks), "sensitivity": self.sensitivity,
                "ranks_by_kind": {k: {"weights": len(v), "total_rank": sum(v)} for k, v in by_kind.items() if v}}


class FactorFiles(Mapping[str, LowRank]):
    """Each weight's rank-ALLOCATION_MAX_RANK factors in the work directory, read back when asked for: held in
    memory they were 4·64·(out + in) bytes per weight, the one part of the θ step that grew with the model
    (295 MB on a 1.5B). Written and read as float32 .npy: the same values."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._names: list[str] = []

    def __setitem__(self, name: str, factors: LowRank) -> None:
        np.save(self.directory / f"{name}.b.npy", factors.b)
        np.save(self.directory / f"{name}.a.npy", factors.a)
        self._names.append(name)

    def __getitem__(self, name: str) -> LowRank:
        if name not in self._names:
            raise KeyError(name)
        return LowRank(np.load(self.directory / f"{name}.b.npy"), np.load(self.directory / f"{name}.a.npy"))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass(frozen=True)
class FitPass:
    """Every selected weight fitted at up to ALLOCATION_MAX_RANK, its spectrum, and the per-kind sensitivity:
    all an allocation needs, so several budgets cost one pass."""

    full: Mapping[str, LowRank]  # FactorFiles: on disk
    energy: dict[str, np.ndarray]  # σ_k² of each weight's weighted residual, k < ALLOCATION_MAX_RANK
    total_energy: dict[str, float]  # ‖E·S‖² or ‖E·L‖²: all of it, for the share a rank captures
    costs: list[WeightCosts]
    sensitivity: dict[str, dict[str, float]]
    seconds: dict[str, float]  # the pass's own steps, for convert's report

    def allocate(self, budget_bytes: int, max_weights: int | None) -> Allocation:
        ranks = allocate(self.costs, {k: v["sensitivity"] for k, v in self.sensitivity.items()}, budget_bytes,
                         max_weights)
        return Allocation(self.fits(ranks), budget_bytes, allocation_bytes(self.costs, ranks), max_weights,
                          self.sensitivity, self.seconds)

    def fits(self, ranks: dict[str, int]) -> dict[str, WeightFit]:
        """Factors cut to `ranks` (exact for an SVD) with the share of each weight's energy they capture
        (the expected output error is not recomputed per budget: None)."""
        return {n: WeightFit(quantize_int8(self.full[n].truncate(r)),
                             float(self.energy[n][:r].sum() / max(self.total_energy[n], 1e-300)), None, 0)
                for n, r in ranks.items() if r > 0}


def fit_pass(quantized_path: Path, weights: Callable[[str], np.ndarray], names: list[str],
             calibration: Calibration | None, calib_text: Text, gamma: float, settings: FitSettings, work_dir: Path,
             threads: int = 0, progress: bool = True) -> FitPass:
    quantized = TensorSource(quantized_path)
    fitter = ThetaFitter(ALLOCATION_MAX_RANK, calibration, settings)
    full = FactorFiles(work_dir / "factors")
    energy: dict[str, np.ndarray] = {}
    total_energy: dict[str, float] = {}
    costs = []
    times = StepTimes()
    with times.step("theta spectra"):
        for name in tqdm(names, desc="theta spectra", unit="tensor", disable=not progress, leave=False):
            residual = weights(name) - quantized.dequantize(name)
            factors, captured = fitter.fit(name, residual, min(ALLOCATION_MAX_RANK, *residual.shape))
            full[name] = factors
            energy[name] = (factors.b.astype(np.float64) ** 2).sum(axis=0)
            total_energy[name] = float(energy[name].sum()) / captured if captured > 0 else 0.0
            costs.append(WeightCosts(name, energy[name], component_bytes(*residual.shape), listing_bytes(name)))
    if calibration is None:  # no reference forward: nothing to measure sensitivity with, so every kind counts alike
        sensitivity = {k: {"nll_drop": None, "energy": None, "sensitivity": 1.0}
                       for k in sorted({weight_kind(n) for n in names})}
    else:
        with times.step("theta sensitivity"):
            sensitivity = kind_sensitivity(quantized_path, full, energy, calib_text, gamma, work_dir, threads,
                                           progress)
    return FitPass(full, energy, total_energy, costs, sensitivity, times.seconds)


def allocate_theta(quantized_path: Path, weights: Callable[[str], np.ndarray], names: list[str],
                   calibration: Calibration | None, calib_text: Text, budget: ThetaBudget, max_weights: int | None,
                   gamma: float, settings: FitSettings, work_dir: Path, threads: int = 0,
                   progress: bool = True) -> Allocation:
    """convert's θ step under a budget: one fit pass, one allocation (a % budget is of the quantized file)."""
    fitted = fit_pass(quantized_path, weights, names, calibration, calib_text, gamma, settings, work_dir, threads,
                      progress)
    return fitted.allocate(budget.bytes_for(quantized_path.stat().st_size), max_weights)


def stored_costs(theta: NkatTheta, rank_cap: int) -> list[WeightCosts]:
    """Costs of a stored theta's components: component k captures ‖B[:, k]‖² of energy, since B = U_r·Σ_r."""
    costs = []
    for name, t in sorted(theta.tensors.items()):
        b = t.dequantize().b.astype(np.float64)
        costs.append(WeightCosts(name, (b ** 2).sum(axis=0)[:rank_cap], component_bytes(b.shape[0], t.a.shape[1]),
                                 listing_bytes(name)))
    return costs


def reallocate(theta: NkatTheta, sensitivity: dict[str, float], budget_bytes: int, max_weights: int | None,
               rank_cap: int, gamma: float) -> NkatTheta:
    """A smaller allocation cut from a stored theta: the greedy over its components, each weight at most rank_cap.

    Used by the optimizer to try budgets without refitting: the result uses only components the file holds.
    """
    ranks = allocate(stored_costs(theta, rank_cap), sensitivity, budget_bytes, max_weights)
    return NkatTheta(gamma, {n: theta.tensors[n].truncate(r) for n, r in ranks.items()}, theta.provenance)


# ---- one allocation of types and θ ranks (`--byte-budget`, `--op-budget`) ----

# The types a weight may be written at, from the 3-bit class to 8 bits: the same bits as the base and fewer
# included (a weight moved down pays for another's upgrade), each only where the quantizer writes it as asked for
# that row width (engine.llama.quantize.accepted_types). Each is measured weight by weight (candidates.py).
CANDIDATE_TYPES = (GGMLQuantizationType.Q3_K, GGMLQuantizationType.IQ4_XS, GGMLQuantizationType.Q4_0,
                   GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q4_1,
                   GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q5_1,
                   GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q8_0)


def bits_per_weight(ggml_type: GGMLQuantizationType) -> float:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return 8.0 * size / block


def candidate_types(base: GGMLQuantizationType, row_width: int,
                    input_type: GGMLQuantizationType | None = None) -> list[GGMLQuantizationType]:
    """The types other than `base` a weight with rows of `row_width` values may take: the candidates the quantizer
    accepts, and the input's own type (re-quantizing to it is a copy, as llama.cpp writes it and candidates.py
    measures it: on a quantized input, the first question is which tensors to keep as they are)."""
    extra = (input_type,) if input_type is not None and _is_quantized(input_type) else ()
    wanted = dict.fromkeys(CANDIDATE_TYPES + extra)
    return [t for t in accepted_types(row_width, tuple(wanted)) if t != base]


@dataclass(frozen=True)
class MixAllocation:
    path: Path  # the quantized file with every weight at its allocated type
    choices: dict[str, Choice]
    fits: dict[str, WeightFit]  # weights with rank > 0: θ fitted to the residual of their allocated type
    base_types: dict[str, str]
    budget_bytes: int
    spent_bytes: int
    max_weights: int | None
    sensitivity: dict[str, dict[str, float]]
    speed_price: float  # κ: 0, speed not priced
    type_seconds: dict[str, float]  # the local CPU's seconds per weight value, by type (0 where not priced)
    seconds: dict[str, float] = field(default_factory=dict)  # the θ step's own steps, for convert's report

    @property
    def upgrades(self) -> dict[str, str]:
        """The weights given another type than the base's (fewer bytes or more)."""
        return {n: c.type for n, c in self.choices.items() if c.type != self.base_types[n]}

    def summary(self) -> dict:
        by_type = Counter(f"{self.base_types[n]} -> {t}" for n, t in self.upgrades.items())
        ranks = [c.rank for c in self.choices.values() if c.rank > 0]
        return {"method": "mix", "budget_bytes": self.budget_bytes, "spent_bytes": self.spent_bytes,
                "max_weights": self.max_weights, "weights": len(ranks), "total_rank": sum(ranks),
                "upgrades": dict(sorted(by_type.items())), "upgraded_weights": len(self.upgrades),
                "sensitivity": self.sensitivity, "speed_price": self.speed_price, "type_seconds": self.type_seconds}


def _candidate_step(first: TypeStep, base_error: float, ggml_type: str, error: float, n_bytes: int,
                    theta: bool) -> TypeStep:
    """A weight's step at a candidate type, as the allocation sees it.

    Every type: ‖E·S‖² with S = diag(√E[x²]), cheap. With θ, the spectrum at a candidate type is the base
    type's (`first`, from the θ fit's own metric) times the ratio of the two diagonal errors: fitting a rank-64
    θ at every candidate type of every weight took minutes per type on the 135M default model (one SVD each),
    and a finer type's quantization noise is the same kind of noise, smaller. The θ an upgraded weight keeps
    is then fitted for real to its new residual.
    """
    if not theta:
        return TypeStep(ggml_type, n_bytes, error, np.zeros(0))
    ratio = error / base_error if base_error > 0 else 0.0
    return TypeStep(ggml_type, n_bytes, first.error * ratio, first.energy * ratio)


def allocate_mix(model_path: Path, base_path: Path, ftype: int, imatrix: dict[str, np.ndarray] | None,
                 weights: Callable[[str], np.ndarray], names: list[str], calibration: Calibration | None,
                 calib_text: Text, budget: ThetaBudget, max_weights: int | None, gamma: float, settings: FitSettings,
                 work_dir: Path, threads: int = 0, progress: bool = True,
                 speed_price: float = DEFAULT_SPEED_PRICE) -> MixAllocation:
    """convert's type-and-θ step: each weight's residual measured at each candidate type (quantized weight by
    weight with its importance row, `candidates.py`) and its product time priced by the local CPU's speed of that
    type (engine.measure.type_speed), one greedy, the mixed file quantized by llama.cpp."""
    base, model = TensorSource(base_path), TensorSource(model_path)
    base_types = {n: base.info(n).type for n in names}
    theta = max_weights != 0
    times = StepTimes()
    if theta:  # the base type's spectra and the per-kind sensitivity that converts energy into NLL
        fitted = fit_pass(base_path, weights, names, calibration, calib_text, gamma, settings, work_dir, threads,
                          progress)
        sensitivity = fitted.sensitivity
        times.seconds.update(fitted.seconds)
    else:  # types only: every kind's weighted residual counts alike
        sensitivity = {k: {"nll_drop": None, "energy": None, "sensitivity": 1.0}
                       for k in sorted({weight_kind(n) for n in names})}
    ladders = {n: candidate_types(base_types[n], base.info(n).shape[0], model.info(n).type) for n in names}
    types = sorted({t for ladder in ladders.values() for t in ladder} | set(base_types.values()))
    speed = type_seconds(types, threads) if speed_price > 0 else dict.fromkeys((t.name for t in types), 0.0)
    pad = base.layout.alignment
    steps: dict[str, list[TypeStep]] = {}
    with times.step("theta candidate types"):
        for n in tqdm(names, desc="candidate types", unit="weight", disable=not progress, leave=False):
            weight, at_base = weights(n), base.dequantize(n)
            scale = (np.ones(weight.shape[1]) if calibration is None
                     else calibration.mean_squares[n].astype(np.float64))
            base_error = diagonal_error(weight, at_base, scale)
            first = (TypeStep(base_types[n].name, 0, fitted.total_energy[n], fitted.energy[n]) if theta
                     else TypeStep(base_types[n].name, 0, base_error, np.zeros(0)))
            errors = candidate_errors(model, n, weight, at_base, ladders[n],
                                      None if imatrix is None else imatrix.get(n), scale, threads)
            steps[n] = [first]
            for ggml_type, error in errors.items():
                extra = (_padded(TensorSpec(n, weight.shape, ggml_type).n_bytes, pad)
                         - _padded(base.info(n).n_bytes, pad) + type_listing_bytes(n, ggml_type.name))
                steps[n].append(_candidate_step(first, base_error, ggml_type.name, error, extra, theta))
            steps[n] = [replace(s, seconds=weight.size * speed[s.type]) for s in steps[n]]
    costs = [WeightSteps(n, tuple(steps[n]), component_bytes(*base.numpy_shape(n)), listing_bytes(n)) for n in names]
    budget_bytes = budget.bytes_for(base_path.stat().st_size)
    choices = allocate_mix_math(costs, {k: v["sensitivity"] for k, v in sensitivity.items()}, budget_bytes,
                                max_weights, speed_price)
    pinned = {t.name: t.type for t in base.layout.tensors if _is_quantized(t.type)}
    pinned |= {n: GGMLQuantizationType[c.type] for n, c in choices.items()}
    mixed = work_dir / "mixed.gguf"
    with times.step("theta mixed file"):
        quantize_model(model_path, mixed, ftype, imatrix, threads, pinned)  # every weight named: no rule moves it
        check_types(mixed, pinned)
    written = TensorSource(mixed)
    fitter = ThetaFitter(ALLOCATION_MAX_RANK, calibration, settings)
    fits = {}
    for n, c in choices.items():
        if c.rank == 0:
            continue
        if theta and c.type == base_types[n].name:
            factors, energy = fitted.full[n].truncate(c.rank), fitted.energy[n]
            share = float(energy[:c.rank].sum() / max(fitted.total_energy[n], 1e-300))
        else:  # an upgraded weight's θ is fitted to its new residual
            factors, share = fitter.fit(n, weights(n) - written.dequantize(n), c.rank)
        fits[n] = WeightFit(quantize_int8(factors), share, None, 0)
    return MixAllocation(mixed, choices, fits, {n: t.name for n, t in base_types.items()}, budget_bytes,
                         mix_bytes(costs, choices), max_weights, sensitivity, speed_price, speed, times.seconds)


def _padded(n_bytes: int, alignment: int) -> int:
    """A tensor's bytes in the file: GGUF pads every tensor's data to the file's alignment."""
    return -(-n_bytes // alignment) * alignment


def _is_quantized(ggml_type: GGMLQuantizationType) -> bool:
    return ggml_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                             GGMLQuantizationType.F64, GGMLQuantizationType.I8, GGMLQuantizationType.I16,
                             GGMLQuantizationType.I32, GGMLQuantizationType.I64)
