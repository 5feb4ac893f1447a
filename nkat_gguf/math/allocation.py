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


_ZERO_BUDGET = {"--theta-budget": "allows no theta although theta was asked for; use --theta-rank 0 for a file "
                                   "without theta",
                "--byte-budget": "allows nothing over the base type; leave --byte-budget out for the base type alone"}


def parse_budget(text: str, model_bytes: int, option: str = "--theta-budget") -> ThetaBudget:
    """`2MiB`, `1.5 MiB` or `3%`; refuses negative, zero (nothing allowed), over 100 % and more than the model."""
    stripped = text.strip()
    if stripped.startswith("-"):
        raise InputError(f"{option} {text!r} is negative; give a size such as 2MiB or 3%")
    match = _BUDGET.match(stripped)
    if not match:
        raise InputError(f"{option} {text!r} is not a size: write it as MiB or % of the file, e.g. 2MiB or 3%")
    value, unit = float(match.group(1)), "MiB" if match.group(2).lower() == "mib" else "%"
    if value == 0:
        raise InputError(f"{option} 0 {_ZERO_BUDGET[option]}")
    if unit == "%" and value > 100:
        raise InputError(f"{option} {text} is over 100 %: larger than the model itself")
    if unit == "MiB" and value * MIB > model_bytes:
        raise InputError(f"{option} {text} is larger than the model itself ({model_bytes / MIB:.1f} MiB)")
    return ThetaBudget(value, unit)


def check_max_weights(max_weights: int | None, n_weights: int, option: str = "--theta-weights",
                      lowest: int = 0) -> None:
    if max_weights is not None and not lowest <= max_weights <= n_weights:
        raise InputError(f"{option} {max_weights} is out of range: this model has {n_weights} weights "
                         f"that can carry theta (give {lowest} to {n_weights})")


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


# ---- one allocation of types and θ ranks (convert --byte-budget / --op-budget) ----


@dataclass(frozen=True)
class TypeStep:
    """One type a weight may be written at: the bytes that costs in the file (over the base type's, so a cheaper
    type's are negative), its weighted residual there, and the time one token's product with it takes.

    `error` = ‖(W_ref − deq(W_q))·S‖², `energy[k]` = σ_k² of that same weighted residual (descending): θ of
    rank r at this type leaves error − Σ_{k<r} σ_k². `seconds`: the weight's matrix-vector time at this type on
    the local CPU (engine.measure.type_speed), 0 where not measured.
    """

    type: str
    bytes: int
    error: float
    energy: np.ndarray
    seconds: float = 0.0


@dataclass(frozen=True)
class WeightSteps:
    """A weight's candidate types (steps[0] its base type, at 0 bytes; the rest in any order, cheaper or dearer,
    all accepted for its row width) and θ costs."""

    name: str
    steps: tuple[TypeStep, ...]
    component_bytes: int
    open_bytes: int


@dataclass(frozen=True)
class Choice:
    type: str
    rank: int


@dataclass(frozen=True)
class _Prices:
    """What a move is worth: `types[w]` per unit of a type's weighted error, `theta[w]` per unit of the energy θ
    captures, and `per_second` per second of product time (the speed price: a slower type must buy that much
    more error reduction). The two gains differ only where θ's measured sensitivity is not positive (see
    `type_gains`)."""

    types: dict[str, float]
    theta: dict[str, float]
    per_second: float

    def value(self, w: WeightSteps, step: TypeStep, rank: int) -> float:
        """The weight's priced loss at a step and rank: lower is better."""
        captured = float(step.energy[:min(rank, step.energy.size)].sum())
        return self.types[w.name] * step.error - self.theta[w.name] * captured + self.per_second * step.seconds


def type_gains(sensitivity: dict[str, float]) -> dict[str, float]:
    """The per-kind price of a type's weighted error: the measured sensitivity, and where that is not positive
    (θ on the kind did not lower the calibration NLL: it measured nothing) the least positive one.

    At 0, such a kind's weights went to their cheapest type for free and could never be upgraded: on
    Qwen2.5-Coder-1.5B attn_v and ffn_down (56 weights) went to Q3_K and 82 MB of the budget stayed unspent.
    Measured (BENCHMARKS.md): the least and the median of the positive ones write the same 1.5B file, byte for
    byte (KLD 0.0023 / 0.0059, against 0.0257 / 0.1377 before); on the default model the median took bytes from the
    kinds that measured (0.0427 / 0.0657), a millionth of the least kept the figures of 0 (0.0244 / 0.0350) and
    the least is between (0.0249 / 0.0385).
    """
    positive = [v for v in sensitivity.values() if v > 0]
    least = min(positive) if positive else 1.0
    return {k: v if v > 0 else least for k, v in sensitivity.items()}


def _useful_rank(step: TypeStep, rank: int) -> int:
    """The rank a weight keeps at a step: its components of no energy there (a copy of the reference) dropped."""
    return min(rank, int(np.count_nonzero(step.energy > 0)))


Move = tuple[float, float, int, int, int]  # (benefit per byte, benefit, cost, new step, new rank)


def _best_move(w: WeightSteps, at: int, rank: int, prices: _Prices, left: int, may_open: bool,
               theta: bool) -> Move | None:
    """The affordable move of best benefit per byte, or None. A move of no cost in bytes (a type of the same or
    fewer bytes with a lower priced loss) ranks first, by its benefit.

    A type change keeps the rank, its θ refitted to the new residual, and costs no graph operation, except for
    the components the new type leaves nothing to capture with (a copy of the reference has no residual):
    those are dropped and their bytes freed. A θ component costs its bytes, and the weight's first one also
    its keys and four graph operations.
    """
    best = None
    step = w.steps[at]
    here = prices.value(w, step, rank)
    candidates = []
    if theta and rank < step.energy.size and step.energy[rank] > 0 and (rank > 0 or may_open):
        candidates.append((w.component_bytes + (w.open_bytes if rank == 0 else 0), at, rank + 1))
    for j, s in enumerate(w.steps):
        if j != at:
            kept = _useful_rank(s, rank)
            freed = (rank - kept) * w.component_bytes + (w.open_bytes if rank > 0 and kept == 0 else 0)
            candidates.append((s.bytes - step.bytes - freed, j, kept))
    for cost, j, r in candidates:
        benefit = here - prices.value(w, w.steps[j], r)
        if cost > left or benefit <= 0:
            continue
        move = (benefit / cost if cost > 0 else np.inf, benefit, cost, j, r)
        if best is None or move[:2] > best[:2]:
            best = move
    return best


def _mix_greedy(weights: list[WeightSteps], prices: _Prices, budget: int, theta_allowed: set[str],
                max_weights: int) -> dict[str, tuple[int, int]]:
    """Every weight starts at its cheapest type (the bytes it frees over the base count as budget), then best
    benefit per byte first over every weight's next move, re-evaluated lazily as the budget changes.

    Each move lowers its weight's priced loss, so no weight can cycle; a move that frees bytes wakes the weights
    that could afford nothing.
    """
    state = {w.name: (min(range(len(w.steps)), key=lambda j: (w.steps[j].bytes, prices.value(w, w.steps[j], 0))), 0)
             for w in weights}
    by_name = {w.name: w for w in weights}
    left = budget - sum(by_name[n].steps[at].bytes for n, (at, _) in state.items())
    opened = 0
    heap: list[tuple[float, float, str, tuple[int, int]]] = []
    idle: set[str] = set()

    def move_of(name: str) -> Move | None:
        at, rank = state[name]
        return _best_move(by_name[name], at, rank, prices, left, opened < max_weights, name in theta_allowed)

    def push(name: str) -> None:
        move = move_of(name)
        if move is None:
            idle.add(name)
        else:
            heapq.heappush(heap, (-move[0], -move[1], name, (move[3], move[4])))

    for w in weights:
        push(w.name)
    while heap:
        _, _, name, target = heapq.heappop(heap)
        move = move_of(name)
        if move is None:
            idle.add(name)
            continue
        if (move[3], move[4]) != target:  # the budget left or the operations changed its best move
            heapq.heappush(heap, (-move[0], -move[1], name, (move[3], move[4])))
            continue
        rank = state[name][1]
        left -= move[2]
        closed = rank > 0 and move[4] == 0
        opened += (move[4] > 0) - (rank > 0)
        state[name] = target
        push(name)
        if move[2] < 0 or closed:  # bytes or an operation freed: the weights that could afford nothing may now
            for other in sorted(idle):
                idle.discard(other)
                push(other)
    return state


def allocate_mix(weights: list[WeightSteps], sensitivity: dict[str, float], budget_bytes: int,
                 max_weights: int | None = None, speed_price: float = 0.0) -> dict[str, Choice]:
    """Every weight's type and θ rank, within `budget_bytes` over the base types and at most `max_weights`
    adapted weights (0: types only, a llama.cpp per-tensor mix; None: no operation budget).

    Types of fewer bytes than the base are candidates too: the bytes a weight frees pay for another's upgrade.
    `speed_price` κ prices product time: a move that makes the base file's time x % longer must lower its
    sensitivity-weighted error by κ·x % of the base file's (0: speed not priced).

    With the operation budget binding, the weights the byte budget alone would adapt are ranked by the
    benefit their θ got, the best `max_weights` keep θ, and the bytes are spent again with θ on those only.
    """
    if budget_bytes < 0:
        raise ValueError("budget_bytes must be >= 0")
    kinds = type_gains(sensitivity)
    gains = {w.name: float(sensitivity.get(weight_kind(w.name), 0.0)) for w in weights}
    types = {w.name: kinds.get(weight_kind(w.name), 0.0) for w in weights}
    base_loss = sum(types[w.name] * w.steps[0].error for w in weights)
    base_seconds = sum(w.steps[0].seconds for w in weights)
    prices = _Prices(types, gains, speed_price * base_loss / base_seconds if base_seconds > 0 else 0.0)
    limit = len(weights) if max_weights is None else max_weights
    everyone = {w.name for w in weights} if limit > 0 else set()
    state = _mix_greedy(weights, prices, budget_bytes, everyone, len(weights))
    adapted = {n: s for n, s in state.items() if s[1] > 0}
    if len(adapted) > limit:
        by_name = {w.name: w for w in weights}
        benefit = {n: gains[n] * float(by_name[n].steps[at].energy[:r].sum()) for n, (at, r) in adapted.items()}
        keep = set(sorted(benefit, key=lambda n: (-benefit[n], n))[:limit])
        state = _mix_greedy(weights, prices, budget_bytes, keep, limit)
    by_name = {w.name: w for w in weights}
    return {n: Choice(by_name[n].steps[at].type, r) for n, (at, r) in state.items()}


def mix_bytes(weights: list[WeightSteps], choices: dict[str, Choice]) -> int:
    """Bytes an allocation adds over the base types, by the same costs the greedy used."""
    total = 0
    for w in weights:
        choice = choices[w.name]
        step = next(s for s in w.steps if s.type == choice.type)
        total += step.bytes - w.steps[0].bytes
        total += (w.open_bytes + choice.rank * w.component_bytes) if choice.rank > 0 else 0
    return total
