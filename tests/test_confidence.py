"""The confidence and long-text indices against brute-force numpy on small vocabularies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nkat_gguf.math.confidence import (
    ECE_BINS,
    CalibrationAccumulator,
    abnormal_drops,
    bounded_minimum,
    calibration_metrics,
    drift_per_1k,
    entropy_and_max_logit,
    fit_temperature,
    mean_nll,
    oscillation_index,
    repetition_share,
    run_starts,
    series_indices,
)


def softmax64(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def brute_force(logits: np.ndarray, targets: np.ndarray, temperature: float) -> dict:
    """Every metric the slow, obvious way: a full one-hot, a Python loop over bins."""
    p = softmax64(logits, temperature)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(targets)), targets] = 1.0
    confidence, predicted = p.max(axis=1), p.argmax(axis=1)
    correct = predicted == targets
    ece = 0.0
    for b in range(ECE_BINS):
        low, high = b / ECE_BINS, (b + 1) / ECE_BINS
        members = (confidence > low) & (confidence <= high)
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return {"ece": ece, "brier": float(((p - onehot) ** 2).sum(axis=1).mean()),
            "nll": float(-np.log(p[np.arange(len(targets)), targets]).mean()),
            "top1_accuracy": float(correct.mean()), "mean_confidence": float(confidence.mean())}


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.3])
def test_metrics_match_brute_force(temperature: float) -> None:
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((400, 11)) * 2.5).astype(np.float32)
    targets = np.where(rng.random(400) < 0.5, logits.argmax(axis=1), rng.integers(0, 11, 400))
    got = calibration_metrics(logits, targets, temperature).as_dict()
    for key, value in brute_force(logits, targets, temperature).items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert sum(b["count"] for b in got["bins"]) == 400


def test_streaming_equals_one_shot() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((300, 9)).astype(np.float32)
    targets = rng.integers(0, 9, 300)
    acc = CalibrationAccumulator(1.4)
    for part in np.array_split(np.arange(300), [70, 180]):
        acc.add(logits[part], targets[part])
    streamed, whole = acc.result().as_dict(), calibration_metrics(logits, targets, 1.4).as_dict()
    assert [b["count"] for b in streamed.pop("bins")] == [b["count"] for b in whole.pop("bins")]
    assert streamed == pytest.approx(whole)


def test_bounded_minimum_finds_known_minima_in_few_evaluations() -> None:
    calls: list[float] = []

    def f(t: float) -> float:  # smooth and unimodal on [0.5, 3], like mean NLL against T
        calls.append(t)
        return t + 2.0 / t + math.log(t)

    expected = (-1.0 + math.sqrt(9.0)) / 2.0  # f'(t) = 1 − 2/t² + 1/t = 0  →  t² + t − 2 = 0  →  t = 1
    assert bounded_minimum(f, 0.5, 3.0) == pytest.approx(expected, abs=1e-4)
    assert all(0.5 <= t <= 3.0 for t in calls) and len(calls) <= 15  # golden section alone needs 23
    assert bounded_minimum(lambda t: (t - 1.234) ** 2 + 3, 0.5, 3.0) == pytest.approx(1.234, abs=1e-4)
    assert bounded_minimum(lambda t: t, 0.5, 3.0) == pytest.approx(0.5, abs=1e-3)  # the bound is the minimum
    assert bounded_minimum(lambda t: abs(t - 2.9), 0.5, 3.0) == pytest.approx(2.9, abs=1e-3)  # not smooth


@pytest.mark.parametrize("true_t", [0.7, 1.0, 1.8])
def test_temperature_fit_recovers_the_sampling_temperature(true_t: float) -> None:
    """Targets drawn from softmax(z / T): the fitted T is T within 1 %."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((40000, 32)) * 3.0).astype(np.float32)
    p = softmax64(logits, true_t)
    targets = (p.cumsum(axis=1) > rng.random((len(p), 1))).argmax(axis=1)
    rows = np.array_split(logits, 4)
    fitted = fit_temperature(rows, np.array_split(targets, 4))
    assert fitted == pytest.approx(true_t, rel=0.01)
    assert mean_nll(rows, np.array_split(targets, 4), fitted) <= mean_nll(rows, np.array_split(targets, 4), 1.2 * fitted)


def test_entropy_and_max_logit_match_brute_force() -> None:
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((50, 13)) * 4).astype(np.float32)
    p = softmax64(logits)
    entropy, top = entropy_and_max_logit(logits)
    np.testing.assert_allclose(entropy, -(p * np.log(p)).sum(axis=1), atol=1e-5)
    np.testing.assert_allclose(top, logits.max(axis=1))


def test_oscillation_index_bounds() -> None:
    assert oscillation_index(np.arange(100.0)) == pytest.approx(0.0)
    assert oscillation_index(np.tile([1.0, -1.0], 50)) == pytest.approx(2.0)
    noise = np.random.default_rng(5).standard_normal(200000)
    assert oscillation_index(noise) == pytest.approx(np.sqrt(3.0), rel=0.02)  # white noise: E|Δ²|/E|Δ| = √3


def test_drift_drops_and_repetition() -> None:
    assert drift_per_1k(0.002 * np.arange(500) + 1.0) == pytest.approx(2.0)
    entropy = np.full(400, 3.0)
    entropy[200:260] = 0.2  # a collapse of 60 tokens
    mask = abnormal_drops(entropy)
    first = int(np.flatnonzero(mask)[0])
    assert run_starts(mask) == [first] and 200 <= first < 232  # found once, once the trailing mean has fallen
    indices = series_indices(entropy, np.zeros(400))
    assert indices.drop_positions == [first] and indices.drop_share == pytest.approx(mask.mean())
    assert abnormal_drops(np.full(400, 3.0)).sum() == 0
    assert repetition_share(list(range(40))) == 0.0
    assert repetition_share([1, 2, 3, 4, 5] * 20) == pytest.approx(1 - 5 / 97)
