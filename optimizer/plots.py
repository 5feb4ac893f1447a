"""optimization_results.png: Optuna's own matplotlib plots, stacked into one image readable at a glance.

Top: the TPE score of every trial and the best so far. Below: the score against rank and against γ.
A Pareto study adds its front (perplexity against slowdown).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
from optuna.visualization import matplotlib as plots

from nkat_gguf.format.atomic import atomic_output

DPI = 110


def _pixels(axes: object) -> np.ndarray:
    """One Optuna figure rendered to RGB pixels, then closed."""
    figure = np.atleast_1d(axes).flat[0].figure
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return pixels


def _stack(images: list[np.ndarray]) -> np.ndarray:
    """Images one above the other on white, left-aligned."""
    width = max(i.shape[1] for i in images)
    padded = [np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=255) for i in images]
    return np.concatenate(padded, axis=0)


def write_plots(study: optuna.Study, path: Path, pareto: bool) -> Path:
    """History and parameter plots of `study` as one PNG, written atomically."""
    matplotlib.use("Agg")  # files only: no display on servers

    # A Pareto study has no single value: plot the TPE score, recorded on every trial, instead.
    score = (lambda t: t.user_attrs["tpe_score"]) if pareto else None
    with plt.rc_context({"figure.dpi": DPI, "figure.figsize": (10, 4.5), "font.size": 11}):
        panels = [plots.plot_optimization_history(study, target=score, target_name="TPE score"),
                  plots.plot_slice(study, target=score, target_name="TPE score")]  # every parameter seen
        if pareto:
            panels.append(plots.plot_pareto_front(study, target_names=["perplexity", "slowdown"]))
        image = _stack([_pixels(p) for p in panels])
    with atomic_output(path) as tmp:
        plt.imsave(tmp, image, format="png")
    return path
