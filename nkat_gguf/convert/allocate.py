"""convert's θ step under `--theta-budget`: fit every weight at the largest rank, measure, allocate, cut.

Each selected weight's residual is fitted once at up to ALLOCATION_MAX_RANK components, by the same fit
as a uniform rank (`theta_fit.ThetaFitter`: whitened or diagonal), and the energy of each component taken
(‖B[:, k]‖² = σ_k², since B = U_r·Σ_r); the per-kind sensitivity is measured on the calibration text; the global greedy
(`allocation.allocate`) chooses the ranks; every fit is truncated to its rank (exact for an SVD).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from nkat_gguf.convert.calibrate import Calibration
from nkat_gguf.convert.sensitivity import kind_sensitivity
from nkat_gguf.convert.theta_fit import FitSettings, ThetaFitter, WeightFit
from nkat_gguf.format.nkat import NkatTheta, component_bytes, listing_bytes
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.allocation import KINDS, ThetaBudget, WeightCosts, allocate, allocation_bytes, weight_kind
from nkat_gguf.math.theta import LowRank, quantize_int8
from nkat_gguf.texts import Text

ALLOCATION_MAX_RANK = 64  # the most components one weight can get under a budget


@dataclass(frozen=True)
class Allocation:
    fits: dict[str, WeightFit]  # allocated weights only: factors at their rank, captured energy
    budget_bytes: int
    spent_bytes: int
    max_weights: int | None
    sensitivity: dict[str, dict[str, float]]  # kind -> nll_drop, energy, sensitivity

    def summary(self) -> dict:
        ranks = {n: f.theta.rank for n, f in self.fits.items()}
        by_kind = {k: sorted(r for n, r in ranks.items() if weight_kind(n) == k) for k in KINDS}
        return {"method": "budget", "budget_bytes": self.budget_bytes, "spent_bytes": self.spent_bytes,
                "max_weights": self.max_weights, "weights": len(ranks), "sensitivity": self.sensitivity,
                "ranks_by_kind": {k: {"weights": len(v), "total_rank": sum(v)} for k, v in by_kind.items() if v}}


@dataclass(frozen=True)
class FitPass:
    """Every selected weight fitted at up to ALLOCATION_MAX_RANK, its spectrum, and the per-kind sensitivity:
    all an allocation needs, so several budgets cost one pass."""

    full: dict[str, LowRank]
    energy: dict[str, np.ndarray]  # σ_k² of each weight's weighted residual, k < ALLOCATION_MAX_RANK
    total_energy: dict[str, float]  # ‖E·S‖² or ‖E·L‖²: all of it, for the share a rank captures
    costs: list[WeightCosts]
    sensitivity: dict[str, dict[str, float]]

    def allocate(self, budget_bytes: int, max_weights: int | None) -> Allocation:
        ranks = allocate(self.costs, {k: v["sensitivity"] for k, v in self.sensitivity.items()}, budget_bytes,
                         max_weights)
        return Allocation(self.fits(ranks), budget_bytes, allocation_bytes(self.costs, ranks), max_weights,
                          self.sensitivity)

    def fits(self, ranks: dict[str, int]) -> dict[str, WeightFit]:
        """Factors cut to `ranks` (exact for an SVD) with the share of each weight's energy they capture
        (the expected output error is not recomputed per budget: NaN)."""
        return {n: WeightFit(quantize_int8(self.full[n].truncate(r)),
                             float(self.energy[n][:r].sum() / max(self.total_energy[n], 1e-300)), float("nan"), 0)
                for n, r in ranks.items() if r > 0}


def fit_pass(quantized_path: Path, weights: Callable[[str], np.ndarray], names: list[str],
             calibration: Calibration | None, calib_text: Text, gamma: float, settings: FitSettings, work_dir: Path,
             threads: int = 0, progress: bool = True) -> FitPass:
    quantized = TensorSource(quantized_path)
    fitter = ThetaFitter(ALLOCATION_MAX_RANK, calibration, settings)
    full: dict[str, LowRank] = {}
    energy: dict[str, np.ndarray] = {}
    total_energy: dict[str, float] = {}
    costs = []
    for name in tqdm(names, desc="theta spectra", unit="tensor", disable=not progress, leave=False):
        residual = weights(name) - quantized.dequantize(name)
        full[name], captured = fitter.fit(name, residual, min(ALLOCATION_MAX_RANK, *residual.shape))
        energy[name] = (full[name].b.astype(np.float64) ** 2).sum(axis=0)
        total_energy[name] = float(energy[name].sum()) / captured if captured > 0 else 0.0
        costs.append(WeightCosts(name, energy[name], component_bytes(*residual.shape), listing_bytes(name)))
    if calibration is None:  # no reference forward: nothing to measure sensitivity with, so every kind counts alike
        sensitivity = {k: {"nll_drop": float("nan"), "energy": float("nan"), "sensitivity": 1.0}
                       for k in sorted({weight_kind(n) for n in names})}
    else:
        sensitivity = kind_sensitivity(quantized_path, full, energy, calib_text, gamma, work_dir, threads, progress)
    return FitPass(full, energy, total_energy, costs, sensitivity)


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
