"""Calibration: the input statistics each weight sees on the calibration text.

One pass over the calibration windows serves two uses: the activation weighting of theta's SVD and
llama.cpp's importance matrix for quantization. convert collects them inside llama.cpp's own graph
(nkat_gguf.engine.calibrate.calibration), so every architecture llama.cpp runs is calibrated; the PyTorch forward
(`calibrate_with_forward`, llama family only) is the independent check on the same windows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nkat_gguf.engine.calibrate.calibration import (
    WINDOW,
    CachedMoments,
    GraphStatistics,
    cache_key,
    cache_path,
    collect_statistics,
    load_cached,
    store_cached,
)
from nkat_gguf.convert.moment_groups import GroupedMoments, layer_groups, moment_bytes
from nkat_gguf.engine.forward.llama import LlamaForward
from nkat_gguf.engine.llama.vocab import tokens_and_bos
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.format.imatrix import NEVER_RECORDED, input_widths, write_imatrix_file
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.texts import Text

DEFAULT_CALIB_TOKENS = 32 * WINDOW  # llama-imatrix's usual order of magnitude, and what the built-in text holds
FORWARD_WINDOWS_PER_PASS = 8  # the PyTorch forward holds every token of a pass in memory at once


@dataclass(frozen=True)
class Calibration:
    mean_squares: dict[str, np.ndarray]  # weight name -> E[x^2] per input column, float32
    tokens: int
    text_sha256: str
    text_source: str
    # weight name -> E[x xᵀ] (in, in) float32 of its input; one shared array per distinct input (q/k/v,
    # gate/up), only for inputs at most engine.calibration.MAX_SECOND_MOMENT_WIDTH wide; empty unless asked for.
    # Several groups of layers (a memory budget): a GroupedMoments that holds one group at a time.
    second_moments: Mapping[str, np.ndarray] = field(default_factory=dict)
    moment_groups: int = 1


def calibration_windows(model_path: Path, text: Text, calib_tokens: int | None = None,
                        window: int = WINDOW) -> list[list[int]]:
    """Consecutive windows of `window` tokens from the start of the text, as llama-imatrix cuts its chunks
    (BOS in place of each window's first token when the model adds one).

    `calib_tokens` None: DEFAULT_CALIB_TOKENS, or as many whole windows as the text holds if fewer.
    A number is rounded down to whole windows and must fit in the text.
    """
    tokens, bos = tokens_and_bos(model_path, text.content)
    available = len(tokens) // window
    if available == 0:
        raise InputError(f"the calibration text {text.source} has {len(tokens)} tokens, fewer than one window of "
                         f"{window}; give a longer --calib-text")
    if calib_tokens is None:
        n = min(DEFAULT_CALIB_TOKENS // window, available)
    elif calib_tokens < window:
        raise InputError(f"--calib-tokens {calib_tokens} is smaller than one window of {window} tokens")
    elif calib_tokens > available * window:
        raise InputError(f"--calib-tokens {calib_tokens} is more than the calibration text holds: {text.source} has "
                         f"{len(tokens)} tokens, at most {available * window} in whole windows of {window}")
    else:
        n = calib_tokens // window
    windows = [tokens[i * window:(i + 1) * window] for i in range(n)]
    if bos is not None:
        windows = [[bos, *w[1:]] for w in windows]
    return windows


def recorded_weights(model_path: Path) -> set[str]:
    """The weights whose inputs are recorded: every matrix llama.cpp may quantize with an importance matrix,
    except the embedding table (a tied head multiplies it too, but llama-imatrix leaves it out as well)."""
    return set(input_widths(read_layout(model_path))) - NEVER_RECORDED


def calibrate(model_path: Path, text: Text, calib_tokens: int | None = None, second_moments: bool = False,
              threads: int = 0, progress: bool = True, save_imatrix: Path | None = None,
              cache: bool = True, model_sha256: str | None = None, memory: int | None = None) -> Calibration:
    """Evaluate the calibration windows in llama.cpp on `model_path` (the weights theta aims at).

    `memory`: bytes of Σxxᵀ held at once (None: no bound); above it the second moments come in groups of
    layers, one pass each (nkat_gguf.convert.moment_groups). The statistics are cached by (model sha256,
    text sha256, tokens, group): the optimizer and repeated converts of one model do not recompute them.
    `model_sha256`: the model's hash when the caller has it.
    """
    windows = calibration_windows(model_path, text, calib_tokens)
    names = recorded_weights(model_path)
    layout = read_layout(model_path)
    groups = layer_groups(layout, names, memory) if second_moments and memory is not None else [names]
    model_sha = model_sha256 or sha256_file(model_path)

    def run(weights: set[str], outer: bool | set[str], group: str) -> tuple[GraphStatistics, Mapping[str, np.ndarray]]:
        """The statistics and their second moments: read from the cache entry when there is one (one input's
        Σxxᵀ in memory at a time), else those just collected."""
        key = cache_key(model_sha, text.sha256, len(windows), WINDOW, group)
        stats = load_cached(key, bool(outer)) if cache else None
        if stats is None:
            stats = collect_statistics(model_path, windows, weights, outer, threads, progress)
            if not cache:
                return stats, stats.take_second_moments() if outer else {}
            store_cached(key, stats, bool(outer))
            stats.outer_sums = {}  # on disk now: held again one input at a time
        return stats, CachedMoments(cache_path(key), stats) if outer else {}

    grouped = len(groups) > 1
    stats, first = run(names, groups[0] if grouped else second_moments, _group_tag(groups[0]) if grouped else "")
    if save_imatrix is not None:
        write_imatrix_file(save_imatrix, stats.sums, stats.counts, [text.source], len(windows), WINDOW)
    moments: Mapping[str, np.ndarray] = first
    if grouped:
        expected = {n for n, size in moment_bytes(layout, set(stats.sums)).items() if size}
        moments = GroupedMoments(groups, expected, first, lambda group: run(group, group, _group_tag(group))[1])
    return Calibration(stats.mean_squares(), stats.tokens, text.sha256, text.source, moments, len(groups))


def _group_tag(group: set[str]) -> str:
    """What a group's cache entry is keyed on: the weights whose second moments it holds."""
    return ",".join(sorted(group))


def calibrate_with_forward(source: TensorSource, weights: Callable[[str], np.ndarray], model_path: Path,
                           text: Text, calib_tokens: int | None = None, progress: bool = True) -> Calibration:
    """The PyTorch forward (llama family) over the same windows as `calibrate`: E[x²] only."""
    windows = calibration_windows(model_path, text, calib_tokens)
    forward = LlamaForward(source, weights=weights)
    totals: dict[str, np.ndarray] = {}
    passes = range(0, len(windows), FORWARD_WINDOWS_PER_PASS)
    for start in tqdm(passes, desc="calibrating (PyTorch forward)", unit="pass", disable=not progress, leave=False):
        chunk = windows[start:start + FORWARD_WINDOWS_PER_PASS]
        for name, mean in forward.input_mean_squares(chunk).items():
            totals[name] = totals.get(name, 0) + mean.astype(np.float64) * len(chunk)
    means = {name: (total / len(windows)).astype(np.float32) for name, total in totals.items()}
    return Calibration(means, len(windows) * WINDOW, text.sha256, text.source)
