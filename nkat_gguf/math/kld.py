"""KL divergence of a model's next-token distributions from a reference's, as llama-perplexity computes it.

Per scored token (tools/perplexity/perplexity.cpp, `log_softmax(..., base_log_prob, tok, kld)`), with
log p_base the reference's stored log-probabilities and log q = log_softmax(logits) this model's:

    KLD      = sum over tokens i with log p_base[i] > -16 of p_base[i] * (log p_base[i] - log q[i])
    nll      = -log q[target],   nll_base = -log p_base[target]
    Δp       = q[target] - p_base[target]
    same top = argmax(logits) == argmax(log p_base) (first index on ties, both sides)

Float32 where stock is float32 (the log-probabilities, each term), float64 sums. The statistics follow
stock's `kl_divergence()`: mean ± sqrt(var / (n - 1)) (0 for n <= 10), percentiles by linear interpolation
between sorted float32 values, the median as the mean of the two middle values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

BASE_LOG_PROB_FLOOR = np.float32(-16.0)  # stock leaves out base tokens below this log-probability
KLD_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001)
P_DIFF_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001)


@dataclass(frozen=True)
class TokenStats:
    """Per scored token: the KL divergence and what stock derives from the target token."""

    kld: np.ndarray  # float64
    nll: np.ndarray  # float32, this model
    nll_base: np.ndarray  # float32, the reference as stored
    p_diff: np.ndarray  # float32, q[target] - p_base[target]
    same_top: np.ndarray  # bool

    @staticmethod
    def concatenate(parts: list[TokenStats]) -> TokenStats:
        return TokenStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in TokenStats.__dataclass_fields__))


def token_stats(logits: np.ndarray, base_log_probs: np.ndarray, targets: np.ndarray) -> TokenStats:
    """Stock's per-token figures for rows of float32 logits (rows, n_vocab) against stored base log-probs."""
    logits = np.asarray(logits, dtype=np.float32)
    rows = np.arange(len(targets))
    top = logits.argmax(axis=1)
    max_logit = logits[rows, top]
    shifted = logits - max_logit[:, None]
    log_sum_exp = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64)).astype(np.float32)
    log_norm = max_logit + log_sum_exp  # log q[i] = logits[i] - log_norm
    nll = log_norm - logits[rows, targets]
    nll_base = -base_log_probs[rows, targets]
    # stock: p_base * (log p_base - logits[i] + log_norm), left to right in float32
    terms = np.exp(base_log_probs) * ((base_log_probs - logits) + log_norm[:, None])
    kld = np.where(base_log_probs > BASE_LOG_PROB_FLOOR, terms, np.float32(0)).sum(axis=1, dtype=np.float64)
    return TokenStats(kld=kld, nll=nll, nll_base=nll_base, p_diff=np.exp(-nll) - np.exp(-nll_base),
                      same_top=top == base_log_probs.argmax(axis=1))


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Stock's `mean_and_uncertainty(sum, sum2, count)`: the mean and its standard error (0 for n <= 10)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 1:
        return 0.0, 0.0
    mean = float(values.sum() / n)
    var = float(np.square(values).sum() / n) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Stock's `percentile`: linear interpolation at fraction * (n - 1), in float32."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = np.float32(fraction) * np.float32(len(sorted_values) - 1)
    ip = int(p)
    p = p - np.float32(ip)
    upper = sorted_values[min(ip + 1, len(sorted_values) - 1)]
    return float((np.float32(1) - p) * sorted_values[ip] + p * upper)


def _median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    return float(sorted_values[n // 2] if n % 2 else np.float32(0.5) * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))


@dataclass(frozen=True)
class KldSummary:
    """What `llama-perplexity --kl-divergence` prints at the end, same names as its output lines."""

    tokens: int
    ppl: float  # Mean PPL(Q), from the float32 nll stock sums
    ppl_stderr: float
    ppl_base: float  # Mean PPL(base), from the stored log-probabilities
    ppl_base_stderr: float
    ppl_correlation: float  # Cor(ln(PPL(Q)), ln(PPL(base)))
    ln_ppl_ratio: float  # Mean ln(PPL(Q)/PPL(base))
    ln_ppl_ratio_stderr: float
    kld: float  # Mean KLD
    kld_stderr: float
    kld_ci95: tuple[float, float]  # mean ± 1.96 standard errors
    kld_max: float
    kld_median: float
    kld_min: float
    kld_percentiles: dict[str, float]  # "99.9", "99.0", ..., "0.1"
    p_diff_mean: float  # Mean Δp (probability of the target, this model minus the reference), as a fraction
    p_diff_stderr: float
    p_diff_max: float
    p_diff_median: float
    p_diff_min: float
    p_diff_percentiles: dict[str, float]
    p_diff_rms: float  # RMS Δp
    p_diff_rms_stderr: float
    same_top: float  # Same top p, as a fraction
    same_top_stderr: float

    def as_dict(self) -> dict:
        """JSON-ready: the interval as a list, as it reads back."""
        return {**asdict(self), "kld_ci95": list(self.kld_ci95)}


def _covariance(a: np.ndarray, b: np.ndarray) -> float:
    """Stock's `covariance`: of the two means (divided by n - 1), 0 below 10 values."""
    n = len(a)
    if n < 10:
        return 0.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (float((a * b).sum() / n) - float(a.sum() / n) * float(b.sum() / n)) / (n - 1)


def summarize(stats: TokenStats) -> KldSummary:
    """The statistics stock prints from the per-token figures of every scored token."""
    n = len(stats.kld)
    log_ppl, log_ppl_err = mean_and_uncertainty(stats.nll)
    log_base, log_base_err = mean_and_uncertainty(stats.nll_base)
    cov = _covariance(stats.nll, stats.nll_base)
    kld, kld_err = mean_and_uncertainty(stats.kld)
    p_diff, p_diff_err = mean_and_uncertainty(stats.p_diff)
    p_diff2 = np.square(stats.p_diff.astype(np.float64))
    mse, mse_err = mean_and_uncertainty(p_diff2)
    rms = math.sqrt(mse)
    same = float(stats.same_top.sum()) / n
    kld_sorted = np.sort(stats.kld.astype(np.float32))  # stock keeps the per-token values as float
    p_sorted = np.sort(stats.p_diff.astype(np.float32))
    name = lambda f: f"{100 * f:.1f}"  # noqa: E731
    return KldSummary(
        tokens=n,
        ppl=math.exp(log_ppl), ppl_stderr=math.exp(log_ppl) * log_ppl_err,
        ppl_base=math.exp(log_base), ppl_base_stderr=math.exp(log_base) * log_base_err,
        ppl_correlation=cov / (log_ppl_err * log_base_err) if log_ppl_err * log_base_err > 0 else 0.0,
        ln_ppl_ratio=log_ppl - log_base,
        ln_ppl_ratio_stderr=math.sqrt(max(log_ppl_err ** 2 + log_base_err ** 2 - 2 * cov, 0.0)),
        kld=kld, kld_stderr=kld_err, kld_ci95=(kld - 1.96 * kld_err, kld + 1.96 * kld_err),
        kld_max=float(kld_sorted[-1]), kld_median=_median(kld_sorted), kld_min=float(kld_sorted[0]),
        kld_percentiles={name(f): percentile(kld_sorted, f) for f in KLD_PERCENTILES},
        p_diff_mean=p_diff, p_diff_stderr=p_diff_err,
        p_diff_max=float(p_sorted[-1]), p_diff_median=_median(p_sorted), p_diff_min=float(p_sorted[0]),
        p_diff_percentiles={name(f): percentile(p_sorted, f) for f in P_DIFF_PERCENTILES},
        p_diff_rms=rms, p_diff_rms_stderr=0.5 / rms * mse_err if rms > 0 else 0.0,
        same_top=same, same_top_stderr=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
    )
