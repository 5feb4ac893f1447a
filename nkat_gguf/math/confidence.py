"""Confidence and long-text indices of next-token distributions: pure numpy, no model (spec: docs/QC.md).

Calibration: ECE over ECE_BINS equal-width confidence bins, multiclass Brier score without a one-hot
(Σ_v (p_v − [v = y])² = Σ_v p_v² − 2·p_y + 1), NLL, top-1 accuracy and mean confidence, accumulated
chunk by chunk so no (tokens, vocab) array outlives its chunk. A temperature T divides the logits.

Long text: per-position entropy and max logit, and from those the oscillation index, entropy drift,
entropy coefficient of variation, abnormal entropy drops and the repetition share of generated tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from nkat_gguf.math.limits import DROP_WINDOW, TEMPERATURE_RANGE

ECE_BINS = 15  # equal-width bins over confidence [0, 1], as in Guo et al. 2017
TEMPERATURE_TOLERANCE = 1e-4  # the search stops when T is known to within about this
DROP_RATIO = 0.5  # a drop: trailing mean below this share of the window's median entropy
REPEAT_N = 4  # n of the n-grams in the repetition share
_GOLDEN_STEP = (3.0 - math.sqrt(5.0)) / 2.0  # 0.382: the golden-section share of the larger part
_SQRT_EPS = math.sqrt(2.2e-16)


# ---- per-row quantities -----------------------------------------------------------------------


@dataclass(frozen=True)
class RowStats:
    """Per-row values of softmax(logits / T) against the target token."""

    nll: np.ndarray  # −log p_y
    confidence: np.ndarray  # max_v p_v
    correct: np.ndarray  # argmax == y (bool)
    brier: np.ndarray  # Σ_v p_v² − 2 p_y + 1


def row_stats(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0,
              scratch: np.ndarray | None = None) -> RowStats:
    """Softmax statistics of (n, vocab) logits at temperature T.

    The one (n, vocab) float32 temporary is `scratch` when given (same shape or larger), so a caller
    scoring many chunks allocates it once. Sums run in float32 (numpy sums rows pairwise) and are
    carried on in float64.
    """
    targets = np.asarray(targets)
    n, vocab = logits.shape
    rows = np.arange(n)
    top = logits.argmax(axis=1)
    buf = np.empty((n, vocab), dtype=np.float32) if scratch is None else scratch[:n, :vocab]
    inv_t = np.float32(1.0 / temperature)
    np.subtract(logits, logits[rows, top][:, None], out=buf)  # ≤ 0, the max at 0
    if temperature != 1.0:
        np.multiply(buf, inv_t, out=buf)
    target_shifted = buf[rows, targets].astype(np.float64)
    np.exp(buf, out=buf)
    z = buf.sum(axis=1).astype(np.float64)
    sum_sq = np.einsum("ij,ij->i", buf, buf).astype(np.float64) / (z * z)
    p_target = np.exp(target_shifted) / z
    return RowStats(nll=np.log(z) - target_shifted, confidence=1.0 / z,  # the max's exp(0) = 1
                    correct=top == targets, brier=sum_sq - 2.0 * p_target + 1.0)


# ---- calibration metrics, streamed --------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationMetrics:
    tokens: int
    ece: float  # Σ_b (n_b / N)·|acc_b − conf_b| over ECE_BINS equal-width bins
    brier: float  # mean over tokens of the multiclass Brier score (0 perfect, 2 worst)
    nll: float  # mean −log p(target), nats
    perplexity: float  # exp(nll)
    top1_accuracy: float
    mean_confidence: float
    bins: list[dict]  # per bin: lower, upper, count, confidence, accuracy (None when empty)

    def as_dict(self) -> dict:
        return asdict(self)


class CalibrationAccumulator:
    """Sums per bin and overall, fed one chunk of logits at a time at a fixed temperature."""

    def __init__(self, temperature: float = 1.0, n_bins: int = ECE_BINS):
        self.temperature = float(temperature)
        self.n_bins = n_bins
        self.count = np.zeros(n_bins, dtype=np.int64)
        self.sum_confidence = np.zeros(n_bins)
        self.sum_correct = np.zeros(n_bins)
        self.sum_nll = self.sum_brier = 0.0
        self._scratch: np.ndarray | None = None

    def add(self, logits: np.ndarray, targets: np.ndarray) -> None:
        if self._scratch is None or self._scratch.shape[0] < logits.shape[0] or self._scratch.shape[1] != logits.shape[1]:
            self._scratch = np.empty(logits.shape, dtype=np.float32)
        self.add_rows(row_stats(logits, targets, self.temperature, self._scratch))

    def add_rows(self, rows: RowStats) -> None:
        bins = confidence_bins(rows.confidence, self.n_bins)
        self.count += np.bincount(bins, minlength=self.n_bins)
        self.sum_confidence += np.bincount(bins, rows.confidence, self.n_bins)
        self.sum_correct += np.bincount(bins, rows.correct.astype(np.float64), self.n_bins)
        self.sum_nll += float(rows.nll.sum())
        self.sum_brier += float(rows.brier.sum())

    def result(self) -> CalibrationMetrics:
        n = int(self.count.sum())
        if n == 0:
            raise ValueError("no tokens were added")
        nonempty = self.count > 0
        conf = np.divide(self.sum_confidence, self.count, out=np.zeros(self.n_bins), where=nonempty)
        acc = np.divide(self.sum_correct, self.count, out=np.zeros(self.n_bins), where=nonempty)
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        bins = [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(self.count[b]),
                 "confidence": float(conf[b]) if nonempty[b] else None,
                 "accuracy": float(acc[b]) if nonempty[b] else None} for b in range(self.n_bins)]
        nll = self.sum_nll / n
        return CalibrationMetrics(
            tokens=n, ece=float(np.sum(self.count * np.abs(acc - conf)) / n), brier=self.sum_brier / n,
            nll=nll, perplexity=math.exp(nll), top1_accuracy=float(self.sum_correct.sum() / n),
            mean_confidence=float(self.sum_confidence.sum() / n), bins=bins)


def confidence_bins(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin b holds confidences in (b/n, (b+1)/n]; confidence 0 (impossible after softmax) goes to bin 0."""
    return np.clip(np.ceil(np.asarray(confidence) * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def calibration_metrics(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> CalibrationMetrics:
    """All calibration metrics of one array of logits (tests, small inputs)."""
    acc = CalibrationAccumulator(temperature)
    acc.add(logits, targets)
    return acc.result()


# ---- temperature --------------------------------------------------------------------------------


def bounded_minimum(f: Callable[[float], float], low: float, high: float,
                    tolerance: float = TEMPERATURE_TOLERANCE, max_evaluations: int = 100) -> float:
    """argmin of a unimodal f on [low, high] by Brent's method (R. Brent, *Algorithms for Minimization
    without Derivatives*, 1973, ch. 5): parabolic steps through the three best points while they shrink
    the bracket fast enough, golden-section steps otherwise. On a smooth f such as mean NLL against T it
    needs about 10 evaluations for a bracket of 1e-4, where pure golden section needs about 23."""
    a, b = low, high
    x = w = v = a + _GOLDEN_STEP * (b - a)
    fx = fw = fv = f(x)
    step = previous = 0.0  # the last step, and the one before it
    for _ in range(max_evaluations):
        middle = 0.5 * (a + b)
        tol1 = _SQRT_EPS * abs(x) + tolerance / 3.0
        if abs(x - middle) <= 2.0 * tol1 - 0.5 * (b - a):
            break
        parabolic = False
        if abs(previous) > tol1:  # try the vertex of the parabola through x, w, v
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = abs(q)
            if abs(p) < abs(0.5 * q * previous) and q * (a - x) < p < q * (b - x):
                previous, step = step, p / q
                u = x + step
                if u - a < 2.0 * tol1 or b - u < 2.0 * tol1:
                    step = tol1 if x < middle else -tol1
                parabolic = True
        if not parabolic:
            previous = (b - x) if x < middle else (a - x)
            step = _GOLDEN_STEP * previous
        u = x + (step if abs(step) >= tol1 else math.copysign(tol1, step))
        fu = f(u)
        if fu <= fx:
            if u < x:
                b = x
            else:
                a = x
            v, fv, w, fw, x, fx = w, fw, x, fx, u, fu
        else:
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v in (x, w):
                v, fv = u, fu
    return x


def mean_nll(logit_rows: Sequence[np.ndarray], target_rows: Sequence[np.ndarray], temperature: float) -> float:
    """Mean −log softmax(z / T)[y] over several (n_i, vocab) arrays."""
    total = count = 0.0
    scratch: np.ndarray | None = None
    for logits, targets in zip(logit_rows, target_rows):
        if scratch is None or scratch.shape != logits.shape:
            scratch = np.empty(logits.shape, dtype=np.float32)
        np.multiply(logits, np.float32(1.0 / temperature), out=scratch)
        row_max = scratch.max(axis=1, keepdims=True)
        np.subtract(scratch, row_max, out=scratch)
        target_shifted = scratch[np.arange(len(targets)), targets].astype(np.float64)
        np.exp(scratch, out=scratch)
        total += float(np.sum(np.log(scratch.sum(axis=1).astype(np.float64)) - target_shifted))
        count += len(targets)
    return total / count


def fit_temperature(logit_rows: Sequence[np.ndarray], target_rows: Sequence[np.ndarray],
                    bounds: tuple[float, float] = TEMPERATURE_RANGE) -> float:
    """The single T in `bounds` minimising mean NLL (convex in 1/T, so unimodal in T: Brent's method)."""
    return bounded_minimum(lambda t: mean_nll(logit_rows, target_rows, t), *bounds)


# ---- long text ----------------------------------------------------------------------------------


def entropy_and_max_logit(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: entropy of softmax(logits) in nats, and the max logit."""
    top = logits.max(axis=1)
    shifted = logits - top[:, None]
    exp = np.exp(shifted)
    z = exp.sum(axis=1).astype(np.float64)
    weighted = np.einsum("ij,ij->i", exp, shifted).astype(np.float64)  # Σ e^s·s; H = log Z − Σ p·s
    return np.log(z) - weighted / z, top.astype(np.float64)


@dataclass(frozen=True)
class SeriesIndices:
    positions: int
    oscillation_index: float  # mean |Δ² m| / mean |Δ m| of the max-logit series m (0 … 2)
    entropy_mean: float
    entropy_drift_per_1k: float  # least-squares slope of entropy over position, nats per 1,000 tokens
    entropy_cv: float  # std / mean of entropy
    max_logit_mean: float
    drop_positions: list[int]  # first position of each run of abnormal entropy drops
    drop_share: float  # share of positions inside such runs

    def as_dict(self) -> dict:
        return asdict(self)


def oscillation_index(series: np.ndarray) -> float:
    """mean |second difference| / mean |first difference|; 0 for a straight line, 2 for a strict zig-zag."""
    series = np.asarray(series, dtype=np.float64)
    if len(series) < 3:
        raise ValueError("the oscillation index needs at least 3 positions")
    first = np.abs(np.diff(series)).mean()
    return float(np.abs(np.diff(series, 2)).mean() / first) if first > 0 else 0.0


def drift_per_1k(series: np.ndarray) -> float:
    """Least-squares slope of the series against position, per 1,000 positions."""
    x = np.arange(len(series), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(series, dtype=np.float64), 1)[0] * 1000.0)


def abnormal_drops(entropy: np.ndarray, window: int = DROP_WINDOW, ratio: float = DROP_RATIO) -> np.ndarray:
    """Mask of positions t ≥ window−1 where the mean entropy of the `window` tokens ending at t is below
    `ratio` × the median entropy of the whole series."""
    entropy = np.asarray(entropy, dtype=np.float64)
    mask = np.zeros(len(entropy), dtype=bool)
    if len(entropy) < window:
        return mask
    trailing = np.convolve(entropy, np.ones(window) / window, mode="valid")
    mask[window - 1:] = trailing < ratio * np.median(entropy)
    return mask


def run_starts(mask: np.ndarray) -> list[int]:
    """First index of each run of True."""
    mask = np.asarray(mask, dtype=bool)
    starts = np.flatnonzero(mask & ~np.concatenate(([False], mask[:-1])))
    return [int(s) for s in starts]


def series_indices(entropy: np.ndarray, max_logit: np.ndarray) -> SeriesIndices:
    """Every long-text index of one (entropy, max logit) series pair."""
    entropy = np.asarray(entropy, dtype=np.float64)
    mean = float(entropy.mean())
    drops = abnormal_drops(entropy)
    return SeriesIndices(
        positions=len(entropy), oscillation_index=oscillation_index(max_logit), entropy_mean=mean,
        entropy_drift_per_1k=drift_per_1k(entropy), entropy_cv=float(entropy.std() / mean) if mean > 0 else 0.0,
        max_logit_mean=float(np.mean(max_logit)), drop_positions=run_starts(drops), drop_share=float(drops.mean()))


def repetition_share(tokens: Sequence[int], n: int = REPEAT_N) -> float:
    """Share of the sequence's n-grams that already occurred earlier in it (0: none repeats; → 1: a loop)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
