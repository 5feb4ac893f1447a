"""Which weights get theta, at which rank: a global greedy under a byte budget and an operation budget.

Each rank component k of a weight w buys sensitivity[kind(w)] · σ_k², σ_k the k-th singular value of w's
(activation-weighted) residual — the drop in expected output error that component brings, converted into
perplexity by a per-kind factor measured on calibration text — and costs its bytes in the file. The first
component of a weight also pays that weight's keys, and opens a weight: every adapted weight adds four
llama.cpp graph operations whatever its rank, which the operation budget (most weights adapted) caps.

Pure functions: the spectra and sensitivities come in, the ranks go out.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

import numpy as np

from nkat_gguf.errors import InputError

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_KIND = re.compile(r"^blk\.\d+\.([a-z_]+)\.weight$")
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(MiB|%)\s*$", re.IGNORECASE)
MIB = 1 << 20


def weight_kind(name: str) -> str:
    """`blk.3.ffn_down.weight` -> `ffn_down`; a name outside the blocks is its own kind."""
    match = _KIND.match(name)
    return match.group(1) if match else name


@dataclass(frozen=True)
class WeightCosts:
    """One weight's spectrum and byte costs: energy[k] = σ_k² (descending), bytes per component and to open."""

    name: str
    energy: np.ndarray
    component_bytes: int
    open_bytes: int  # keys and name of a listed weight, paid once with its first component


@dataclass(frozen=True)
class ThetaBudget:
    """`--theta-budget`: a size in MiB or a share of the quantized file."""

    value: float
    unit: str  # "MiB" or "%"

    def bytes_for(self, base_file_bytes: int) -> int:
        return int(self.value * MIB) if self.unit == "MiB" else int(self.value / 100.0 * base_file_bytes)

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"


def parse_budget(text: str, model_bytes: int) -> ThetaBudget:
    """`2MiB`, `1.5 MiB` or `3%`; refuses negative, zero (theta asked for, nothing allowed) and more than the model."""
    stripped = text.strip()
    if stripped.startswith("-"):
        raise InputError(f"--theta-budget {text!r} is negative; give a size such as 2MiB or 3%")
    match = _BUDGET.match(stripped)
    if not match:
        raise InputError(f"--theta-budget {text!r} is not a size: write it as MiB or % of the file, e.g. 2MiB or 3%")
    value, unit = float(match.group(1)), "MiB" if match.group(2).lower() == "mib" else "%"
    if value == 0:
        raise InputError("--theta-budget 0 allows no theta although theta was asked for; use --theta-rank 0 "
                         "for a file without theta")
    if (unit == "%" and value > 100) or (unit == "MiB" and value * MIB > model_bytes):
        raise InputError(f"--theta-budget {text} is larger than the model itself ({model_bytes / MIB:.1f} MiB)")
    return ThetaBudget(value, unit)


def check_max_weights(max_weights: int | None, n_weights: int) -> None:
    if max_weights is not None and not 1 <= max_weights <= n_weights:
        raise InputError(f"--theta-max-weights {max_weights} is out of range: this model has {n_weights} weights "
                         f"that can carry theta (give 1 to {n_weights})")


def _greedy(weights: list[WeightCosts], gains: dict[str, float], budget: int, allowed: set[str] | None,
            max_weights: int) -> dict[str, int]:
    """Best-ratio-first over all components; a weight that cannot afford its next component stops growing."""
    ranks = {w.name: 0 for w in weights}
    by_name = {w.name: w for w in weights}
    heap: list[tuple[float, str]] = []

    def push(w: WeightCosts) -> None:
        k = ranks[w.name]
        if k < w.energy.size and (benefit := gains[w.name] * float(w.energy[k])) > 0:
            cost = w.component_bytes + (w.open_bytes if k == 0 else 0)
            heapq.heappush(heap, (-benefit / cost, w.name))

    for w in weights:
        if allowed is None or w.name in allowed:
            push(w)
    left, opened = budget, 0
    while heap:
        _, name = heapq.heappop(heap)
        w, k = by_name[name], ranks[name]
        cost = w.component_bytes + (w.open_bytes if k == 0 else 0)
        if cost > left or (k == 0 and opened >= max_weights):
            continue  # its next components cost the same: this weight is done
        ranks[name], left, opened = k + 1, left - cost, opened + (k == 0)
        push(w)
    return {n: r for n, r in ranks.items() if r > 0}


def allocate(weights: list[WeightCosts], sensitivity: dict[str, float], budget_bytes: int,
             max_weights: int | None = None) -> dict[str, int]:
    """Ranks (weights with rank 0 left out) maximising Σ sensitivity·σ² within both budgets.

    With the operation budget binding, the weights the byte budget alone would open are ranked by the
    benefit they got, the best `max_weights` kept, and the bytes spent again over those only.
    """
    if budget_bytes < 0:
        raise ValueError("budget_bytes must be >= 0")
    gains = {w.name: float(sensitivity.get(weight_kind(w.name), 0.0)) for w in weights}
    limit = len(weights) if max_weights is None else max_weights
    ranks = _greedy(weights, gains, budget_bytes, None, len(weights))
    if len(ranks) <= limit:
        return ranks
    by_name = {w.name: w for w in weights}
    benefit = {n: gains[n] * float(by_name[n].energy[:r].sum()) for n, r in ranks.items()}
    keep = set(sorted(benefit, key=lambda n: (-benefit[n], n))[:limit])
    return _greedy(weights, gains, budget_bytes, keep, limit)


def allocation_bytes(weights: list[WeightCosts], ranks: dict[str, int]) -> int:
    """Bytes an allocation spends, by the same costs the greedy used."""
    by_name = {w.name: w for w in weights}
    return sum(by_name[n].open_bytes + r * by_name[n].component_bytes for n, r in ranks.items() if r > 0)
