"""llama.cpp's quantizers re-implemented in PyTorch, for training against the values llama.cpp will store.

`dequantized(w, kind, imatrix)` returns, for a weight (rows, n) in float32, exactly the values that
`llama_model_quantize` followed by dequantization would give (tested bit for bit against ggml's own
`ggml_quantize_chunk` in tests/test_so8t_train.py). `fake_quantize` wraps it for training: the forward
value is the dequantized weight, the gradient is the straight-through estimator with the block scale
kept differentiable (x̂ = x + s(x)·e, e the rounding error in units of the scale, held fixed), so a
rotation that shrinks a block's largest value is rewarded for the smaller steps that follows.

Emulated exactly (the C code's float32 operations in the same order, vectorised over blocks):
  Q8_0            d = amax/127, q = roundf(x/d)                               (imatrix ignored, as in ggml)
  Q4_0            no imatrix: d = max/−8, q = min(15, trunc(x/d + 8.5));
                  with imatrix: make_qx_quants' search over 19 scales, weights qw·sqrt(σ² + x²)
  IQ4_NL          the non-linear 16-value grid; scale search over 15 tries, weights x² or qw·sqrt(σ² + x²)
Approximated (reference rounding, not the imatrix search; documented, not claimed exact):
  Q4_1            min/max per block of 32
Types outside this list are refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nkat_gguf.errors import InputError

BLOCK = 32
EXACT = ("Q8_0", "Q4_0", "IQ4_NL")
APPROXIMATE = ("Q4_1",)
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
GROUP_MAX_EPS = 1e-15


def supported(kind: str) -> bool:
    return kind in EXACT or kind in APPROXIMATE


def dequantized(w: torch.Tensor, kind: str, imatrix: torch.Tensor | None = None, exact: bool = True) -> torch.Tensor:
    """What llama.cpp stores for `w` (rows, n) as type `kind`, dequantized to float32; no gradient.

    `exact=False` (training) sums the searches' weighted errors in float64 instead of replaying the
    C loop's float32 order: the same values except at near-exact ties between two scales.
    """
    if not supported(kind):
        raise InputError(f"cannot emulate llama.cpp's {kind} quantizer; emulated: {', '.join(EXACT + APPROXIMATE)}")
    if w.shape[-1] % BLOCK:
        raise InputError(f"rows of {w.shape[-1]} values are not a multiple of {BLOCK}, the block of {kind}")
    with torch.no_grad():
        x = w.detach().float().reshape(w.shape[0], -1, BLOCK)  # (rows, blocks, 32)
        total = _seq_sum if exact else _fast_sum
        qw = None if imatrix is None else imatrix.detach().float().reshape(1, -1, BLOCK).expand_as(x)
        if kind == "Q8_0":
            out = _q8_0(x)
        elif kind == "Q4_0":
            out = _q4_0(x) if qw is None else _q4_0_imatrix(x, qw, total)
        elif kind == "IQ4_NL":
            out = _iq4_nl(x, qw, total)
        else:
            out = _q4_1(x)
        return out.reshape(w.shape)


def fake_quantize(w: torch.Tensor, kind: str, imatrix: torch.Tensor | None = None, exact: bool = False) -> torch.Tensor:
    """Forward: `dequantized(w)`. Backward: straight through, plus the block scale's gradient."""
    deq = dequantized(w, kind, imatrix, exact)
    blocks = w.reshape(w.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True)  # (rows, blocks, 1): every emulated scale is ∝ the block's amax
    safe = torch.where(scale.detach() > 0, scale.detach(), torch.ones_like(scale))
    error = ((deq.reshape(blocks.shape) - blocks.detach()) / safe).detach()  # rounding error in units of amax
    # value: deq + 0 + 0; gradient: 1 for w, and `error` through each block's amax
    return deq + (w - w.detach()) + ((scale - scale.detach()) * error).reshape(w.shape)


# ---- the quantizers (x: (rows, blocks, 32) float32) -------------------------------------------------


def _fp16(d: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 then back: round to nearest even half precision."""
    return d.half().float()


def _signed_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, the value with that magnitude), the first such value as in `if (amax < fabsf(v))`."""
    idx = x.abs().argmax(-1, keepdim=True)  # argmax returns the first maximal index
    signed = x.gather(-1, idx)
    return signed.abs(), signed


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over the last axis in order j = 0, 1, … in float32, as the C loops accumulate (keepdim).

    """
    total = torch.zeros_like(t[..., :1])
    for j in range(t.shape[-1]):
        total = total + t[..., j : j + 1]
    return total


def _fast_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ in float64, rounded once: off from the C loop's float32 sum in the last bit at most, which
    changes a choice of scale only at a near-exact tie; 30-100× faster than `_seq_sum`."""
    return t.double().sum(-1, keepdim=True).float()


Summer = Callable[[torch.Tensor], torch.Tensor]


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even (the 1.5·2^23 trick)."""
    return torch.round(v)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    amax, _ = _signed_max(x)
    d = amax / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return _round_away(x * inv) * _fp16(d)


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: half away from zero (exact: v − trunc(v) has no rounding error)."""
    whole = torch.trunc(v)
    return whole + torch.sign(v) * ((v - whole).abs() >= 0.5)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    _, mx = _signed_max(x)
    d = mx / -8
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc(x * inv + 8.5), max=15)  # (int8_t)(x*id + 8.5f), then MIN(15, ·)
    return (q - 8) * _fp16(d)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc((x - lo) * inv + 0.5), max=15)
    return q * _fp16(d) + _fp16(lo)


def _imatrix_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """qw·sqrtf(σ² + x²). torch's vectorised float32 sqrt is not always correctly rounded (sqrtf is):
    the float64 root rounded to float32 is."""
    return qw * torch.sqrt((sigma2 + x * x).double()).float()


def _q4_0_imatrix(x: torch.Tensor, qw: torch.Tensor, total: Summer) -> torch.Tensor:
    """quantize_row_q4_0_impl: σ² over the whole row, then make_qx_quants(32, 8, x, L, 1, weight)."""
    sigma2 = total(x.reshape(x.shape[0], 1, -1) ** 2) / (x.shape[1] * BLOCK)  # (rows, 1, 1)
    w = _imatrix_weights(x, qw, sigma2)
    amax, mx = _signed_max(x)
    nmax = 8

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = torch.clamp(_nearest_int(iscale * x), -nmax, nmax - 1)
        return levels, total(w * x * levels), total(w * levels * levels)

    safe_max = torch.where(amax >= GROUP_MAX_EPS, mx, torch.ones_like(mx))
    levels, sumlx, suml2 = trial(-nmax / safe_max)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1.0), torch.zeros_like(suml2))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s != 0]:
        cand, sumlx, suml2 = trial(-(nmax + 0.1 * torch.tensor(step, dtype=torch.float32)) / safe_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / torch.where(suml2 != 0, suml2, 1.0)
        levels = torch.where(better, cand, levels)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
    scale = torch.where(amax >= GROUP_MAX_EPS, scale, torch.zeros_like(scale))
    return levels * _fp16(scale)


def _best_index(v: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """best_index_int8: the nearest grid index, a tie going to the upper neighbour only if strictly nearer."""
    upper = torch.clamp(torch.searchsorted(grid, v.contiguous(), right=True), 1, len(grid) - 1)
    lower = upper - 1
    pick = torch.where(v - grid[lower] < grid[upper] - v, lower, upper)
    pick = torch.where(v <= grid[0], torch.zeros_like(pick), pick)
    return torch.where(v >= grid[-1], torch.full_like(pick, len(grid) - 1), pick)


def _iq4_nl(x: torch.Tensor, qw: torch.Tensor | None, total: Summer) -> torch.Tensor:
    """quantize_row_iq4_nl_impl(QK4_NL, 32, …, ntry = 7): one block per super-block."""
    grid = torch.tensor(IQ4NL_VALUES, dtype=torch.float32)
    ntry = 7
    if qw is None:
        w = x * x
    else:
        sigma2 = total(x * x) * (2.0 / BLOCK)  # per block: the super-block is the block here
        w = _imatrix_weights(x, qw, sigma2)
    amax, mx = _signed_max(x)
    ok = amax >= GROUP_MAX_EPS
    safe_max = torch.where(ok, mx, torch.ones_like(mx))

    def sums(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = grid[_best_index(inv * x, grid)]
        return total(w * q * x), total(w * q * q)

    d = -safe_max / grid[0]
    sumqx, sumq2 = sums(1 / d)
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, 1.0), torch.zeros_like(sumq2))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = sums((itry + grid[0]) / safe_max)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_d = sumqx / torch.where(sumq2 > 0, sumq2, 1.0)
        d = torch.where(better, new_d, d)
        best = torch.where(better, new_d * sumqx, best)
    d = torch.where(ok, d, torch.zeros_like(d))
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, 1.0), torch.zeros_like(d))
    return grid[_best_index(inv * x, grid)] * _fp16(d)
