"""The paired speed ratio and its 95 % interval (engine/measure.paired_ratio): pure arithmetic, checked by hand."""

from __future__ import annotations

import math

import pytest

from nkat_gguf.engine.measure.speed import paired_ratio


def test_interval_of_the_per_round_ratios():
    # ratios 0.9, 1.0, 0.8: mean 0.9, sd 0.1, t(0.975, 2) = 4.303
    r = paired_ratio([90.0, 100.0, 80.0], [100.0, 100.0, 100.0])
    assert r["ratio"] == pytest.approx(0.9)
    assert r["halfwidth"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert r["ci95"] == pytest.approx([0.9 - r["halfwidth"], 0.9 + r["halfwidth"]])
    assert r["rounds"] == 3


def test_drift_shared_by_both_sides_cancels():
    # the machine slows down round by round; both sides alike: every round's ratio is 0.5 exactly
    r = paired_ratio([50.0, 40.0, 30.0, 20.0], [100.0, 80.0, 60.0, 40.0])
    assert r["ratio"] == pytest.approx(0.5) and r["halfwidth"] == pytest.approx(0.0)


def test_one_round_has_no_interval():
    assert math.isinf(paired_ratio([1.0], [2.0])["halfwidth"])


def test_unpaired_runs_are_refused():
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])
