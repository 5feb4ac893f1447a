"""Second moments per group of layers (--calib-memory): the same θ as all at once, memory bounded by a group."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import nkat_gguf.engine.calibrate.calibration as graph
from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.convert.calibrate import calibrate, calibration_windows, recorded_weights
from nkat_gguf.convert.moment_groups import GroupedMoments, layer_groups, parse_memory
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.nkat import read_theta
from nkat_gguf.texts import load_text

CALIBRATION = load_text(None, "calibration")


def test_a_tiny_budget_gives_one_group_per_layer_and_the_default_one_group(tiny_f32: Path) -> None:
    layout, names = read_layout(tiny_f32), recorded_weights(tiny_f32)
    groups = layer_groups(layout, names, 1)
    assert [sorted({n.split(".")[1] for n in g}) for g in groups] == [["0"], ["1"]]
    assert set().union(*groups) == names
    assert layer_groups(layout, names, parse_memory("4GiB")) == [names]


@pytest.mark.parametrize("text", ["0GiB", "4GB", "-1MiB", "lots"])
def test_a_bad_memory_budget_is_one_line(text: str) -> None:
    with pytest.raises(InputError, match="--calib-memory"):
        parse_memory(text)


def test_grouped_second_moments_equal_the_all_at_once_ones(tiny_f32: Path) -> None:
    whole = calibrate(tiny_f32, CALIBRATION, 1024, second_moments=True, threads=1, progress=False, cache=False)
    grouped = calibrate(tiny_f32, CALIBRATION, 1024, second_moments=True, threads=1, progress=False, cache=False,
                        memory=1)
    assert grouped.moment_groups == 2 and isinstance(grouped.second_moments, GroupedMoments)
    assert sorted(grouped.second_moments) == sorted(whole.second_moments)
    for name in grouped.second_moments:  # layer order: each group's pass runs once
        np.testing.assert_allclose(grouped.second_moments[name], whole.second_moments[name], rtol=1e-6, atol=1e-9)
    assert grouped.second_moments.passes == 2
    assert grouped.mean_squares.keys() == whole.mean_squares.keys()
    for name, mean in whole.mean_squares.items():
        np.testing.assert_array_equal(grouped.mean_squares[name], mean)


def test_grouped_convert_writes_the_same_theta(tiny_f32: Path, tmp_path: Path) -> None:
    reports, thetas = [], []
    for memory in ("4GiB", "1KiB"):
        out = tmp_path / f"{memory}.gguf"
        reports.append(convert(ConvertOptions(input=tiny_f32, output=out, outtype="Q4_0", theta_rank=2,
                                              calib_tokens=1024, calib_memory=memory, progress=False)))
        thetas.append(read_theta(out))
    assert not any("groups of layers" in n for n in reports[0].notes)
    assert any("2 groups of layers" in n for n in reports[1].notes)
    assert thetas[0].tensors.keys() == thetas[1].tensors.keys() and thetas[0].tensors
    for name, theta in thetas[0].tensors.items():
        whole, grouped = theta.dequantize().dense(), thetas[1].tensors[name].dequantize().dense()
        np.testing.assert_allclose(grouped, whole, rtol=0, atol=1e-5 * np.abs(whole).max(), err_msg=name)


def _peak_bytes(model: Path, windows: list[list[int]], outer: set[str]) -> int:
    tracemalloc.start()
    try:
        stats = graph.collect_statistics(model, windows, recorded_weights(model), outer, threads=1, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.outer_sums
    return peak


def test_statistics_memory_does_not_grow_with_the_calibration_tokens(tiny_f32: Path) -> None:
    """numpy's buffers are traced by tracemalloc (llama.cpp's own are not): 4× the tokens, the same peak."""
    windows = calibration_windows(tiny_f32, CALIBRATION, 8 * 512)
    group = layer_groups(read_layout(tiny_f32), recorded_weights(tiny_f32), 1)[0]
    short, long = _peak_bytes(tiny_f32, windows[:2], group), _peak_bytes(tiny_f32, windows, group)
    assert abs(long - short) <= 0.05 * short, (short, long)
