"""Allocation: both budgets hold exactly, zero residuals get rank 0, the byte costs are the file's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.errors import InputError
from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import encode_kv, read_layout, value_from_python
from nkat_gguf.format.nkat import (
    PARTS,
    THETA_TENSORS,
    NkatTheta,
    component_bytes,
    factor_key,
    listing_bytes,
    read_theta,
    theta_metadata,
)
from nkat_gguf.math.allocation import KINDS, MIB, WeightCosts, allocate, allocation_bytes, parse_budget, weight_kind
from nkat_gguf.math.lowrank import residual_spectrum, theta_from_residual
from nkat_gguf.math.theta import LowRank, quantize_int8

RNG = np.random.default_rng(5)
SHAPES = {"attn_q": (64, 64), "attn_k": (16, 64), "ffn_up": (160, 64), "ffn_down": (64, 160)}


def residual(out_dim: int, in_dim: int, decay: float) -> np.ndarray:
    u, _ = np.linalg.qr(RNG.standard_normal((out_dim, out_dim)))
    v, _ = np.linalg.qr(RNG.standard_normal((in_dim, in_dim)))
    k = min(out_dim, in_dim)
    return ((u[:, :k] * decay ** np.arange(k)) @ v[:, :k].T).astype(np.float32)


def problem(n_layers: int = 4, zero: str = "blk.1.ffn_up.weight") -> list[WeightCosts]:
    """Spectra decaying at random rates; one weight's residual is exactly zero (its spectrum computed)."""
    costs = []
    for layer in range(n_layers):
        for kind, shape in SHAPES.items():
            name = f"blk.{layer}.{kind}.weight"
            decay = RNG.uniform(0.6, 0.95)
            energy = (residual_spectrum(np.zeros(shape, np.float32)) if name == zero
                      else decay ** (2.0 * np.arange(min(shape))))
            costs.append(WeightCosts(name, energy, component_bytes(*shape), listing_bytes(name)))
    return costs


SENSITIVITY = {"attn_q": 1.0, "attn_k": 0.5, "ffn_up": 2.0, "ffn_down": 1.5}


@pytest.mark.parametrize("budget", [0, 500, 3_000, 20_000, 200_000])
@pytest.mark.parametrize("max_weights", [None, 1, 3, 10])
def test_both_budgets_hold_and_no_affordable_component_is_left(budget: int, max_weights: int | None) -> None:
    costs = problem()
    ranks = allocate(costs, SENSITIVITY, budget, max_weights)
    spent = allocation_bytes(costs, ranks)
    assert spent <= budget and len(ranks) <= (max_weights or len(costs))
    assert all(r >= 1 for r in ranks.values())
    left = budget - spent
    for w in costs:  # greedy is maximal: nothing with a benefit still fits
        r = ranks.get(w.name, 0)
        if r < w.energy.size and w.energy[r] > 0 and SENSITIVITY[weight_kind(w.name)] > 0:
            opens = r == 0
            affordable = w.component_bytes + (w.open_bytes if opens else 0) <= left
            assert not affordable or (opens and len(ranks) == max_weights), (w.name, r, left)


def test_zero_residual_and_zero_sensitivity_get_rank_zero() -> None:
    costs = problem()
    ranks = allocate(costs, SENSITIVITY | {"attn_k": 0.0}, 10**9)
    assert "blk.1.ffn_up.weight" not in ranks  # its residual is zero
    assert not any(weight_kind(n) == "attn_k" for n in ranks)  # its kind does not pay
    assert ranks["blk.0.ffn_up.weight"] == min(SHAPES["ffn_up"])  # an unlimited budget takes every component


def test_operation_budget_keeps_the_weights_that_pay_most() -> None:
    costs = problem()
    free = allocate(costs, SENSITIVITY, 40_000)
    capped = allocate(costs, SENSITIVITY, 40_000, max_weights=2)
    assert len(free) > 2 and len(capped) == 2
    benefit = {n: SENSITIVITY[weight_kind(n)] * next(w.energy[:r].sum() for w in costs if w.name == n)
               for n, r in free.items()}
    assert set(capped) == set(sorted(benefit, key=benefit.get)[-2:])
    assert sum(capped.values()) > sum(free[n] for n in capped)  # the bytes freed go to the kept weights


def test_spectrum_is_what_theta_from_residual_captures() -> None:
    e = residual(48, 32, 0.8)
    scale = RNG.uniform(0.5, 2.0, 32).astype(np.float32)
    energy = residual_spectrum(e, scale)
    fit = theta_from_residual(e, 5, scale)
    assert np.all(np.diff(energy) <= 1e-9)
    assert fit.captured_energy == pytest.approx(energy[:5].sum() / energy.sum(), rel=1e-4)


def test_byte_costs_are_the_encoded_keys() -> None:
    """listing_bytes + r · component_bytes is exactly what the writer's keys for that weight take."""
    shapes = {"blk.0.attn_q.weight": (64, 64), "blk.12.ffn_down.weight": (64, 160)}
    ranks = {"blk.0.attn_q.weight": 3, "blk.12.ffn_down.weight": 1}
    theta = NkatTheta(1.0, {n: quantize_int8(LowRank(RNG.standard_normal((o, ranks[n])).astype(np.float32),
                                                     RNG.standard_normal((ranks[n], i)).astype(np.float32)))
                            for n, (o, i) in shapes.items()})
    metadata = theta_metadata(theta)
    with_two = len(encode_kv(THETA_TENSORS, value_from_python(metadata[THETA_TENSORS])))
    empty = theta_metadata(NkatTheta(1.0, {}))
    names_and_ranks = with_two - len(encode_kv(THETA_TENSORS, value_from_python(empty[THETA_TENSORS])))
    for name, (o, i) in shapes.items():
        keys = sum(len(encode_kv(factor_key(name, p), value_from_python(metadata[factor_key(name, p)]))) for p in PARTS)
        predicted = listing_bytes(name) + ranks[name] * component_bytes(o, i)
        assert keys + 8 + len(name) + 4 == predicted  # + its name in the list + its rank entry
    assert names_and_ranks == sum(8 + len(n) for n in shapes)


@pytest.mark.parametrize(("text", "expected"), [("2MiB", 2 * MIB), ("1.5 MiB", int(1.5 * MIB)), ("3%", 3_000),
                                                 ("0.5%", 500), ("2mib", 2 * MIB)])
def test_budget_parses_mib_and_percent(text: str, expected: int) -> None:
    assert parse_budget(text, 10 * MIB).bytes_for(100_000) == expected


@pytest.mark.parametrize(("text", "message"), [("-2MiB", "negative"), ("0MiB", "allows no theta"),
                                               ("0%", "allows no theta"), ("11MiB", "larger than the model"),
                                               ("120%", "larger than the model"), ("3", "not a size"),
                                               ("abc", "not a size")])
def test_bad_budgets(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_budget(text, 10 * MIB)


def test_convert_with_a_budget_writes_what_it_allocated(tiny_f32: Path, tmp_path: Path) -> None:
    """The pipeline end to end on the tiny model: v2 ranks within both budgets, recorded in the file and report."""
    out = tmp_path / "budget.nkat.gguf"
    report = convert(ConvertOptions(input=tiny_f32, output=out, outtype="Q4_0", theta_budget="1%",
                                    theta_weights=3, threads=2, progress=False))
    allocation, theta, layout = report.allocation, read_theta(out), read_layout(out)
    theta_bytes = sum(listing_bytes(n) + t.rank * component_bytes(t.b.shape[0], t.a.shape[1])
                      for n, t in theta.tensors.items())
    assert allocation["spent_bytes"] == theta_bytes <= allocation["budget_bytes"]
    # 1 % of the quantized file: the output less θ's per-weight bytes, less its fixed keys and provenance (< 4 KiB)
    without_theta = out.stat().st_size - theta_bytes
    assert 0.01 * (without_theta - 4096) <= allocation["budget_bytes"] <= 0.01 * without_theta
    assert len(theta.tensors) == allocation["weights"] <= 3
    assert theta.ranks == {n: t["rank"] for n, t in report.tensors.items()}
    assert set(allocation["sensitivity"]) == set(KINDS)
    paying = {k for k, v in allocation["sensitivity"].items() if v["sensitivity"] > 0}
    assert {weight_kind(n) for n in theta.tensors} <= paying  # kinds whose θ did not pay get nothing
    assert layout.get(nkat.ALLOCATION_METHOD) == "budget" and layout.get(nkat.ALLOCATION_MAX_WEIGHTS) == 3
    assert json.loads(layout.get(nkat.ALLOCATION_SENSITIVITY)).keys() == set(KINDS)
