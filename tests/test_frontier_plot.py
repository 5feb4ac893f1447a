"""The frontier plot: the envelope is a monotone staircase in size order, and no two labels overlap."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nkat_gguf.evaluate.frontier import envelope_steps, lower_envelope  # noqa: E402
from nkat_gguf.evaluate.plot_labels import overlapping_labels, place_labels  # noqa: E402

MIB = 1 << 20


def _row(name: str, mib: float, ppl: float, kind: str = "imatrix") -> dict:
    return {"name": name, "kind": kind, "file_bytes": int(mib * MIB), "perplexity": {"t": {"ppl": ppl}}}


def test_envelope_is_a_monotone_staircase_whatever_the_row_order() -> None:
    """Rows in run order (not size order), as the frontier writes them: the line used to jump back."""
    rows = [_row("Q2_K", 84.1, 40), _row("Q3_K_L", 93.0, 21), _row("IQ4_NL", 87.5, 24), _row("mix", 88.9, 22.5, "mix"),
            _row("Q3_K_M", 89.2, 23), _row("nkat", 89.9, 20, "nkat")]
    envelope = lower_envelope(rows, "t")
    assert [r["name"] for r in envelope] == ["Q2_K", "IQ4_NL", "mix", "Q3_K_L"]  # mixes count, NKAT does not
    xs, ys = envelope_steps(envelope, "t", int(95 * MIB))
    assert np.all(np.diff(xs) >= 0) and np.all(np.diff(ys) <= 0)
    assert (xs[0], ys[0], xs[-1], ys[-1]) == (int(84.1 * MIB), 40, int(95 * MIB), 21)
    for r in envelope:  # the line passes through every envelope point
        assert any(x == r["file_bytes"] and y == r["perplexity"]["t"]["ppl"] for x, y in zip(xs, ys))


def test_crowded_labels_do_not_overlap() -> None:
    fig, ax = plt.subplots(figsize=(7, 5.5))
    rng = np.random.default_rng(3)
    x, y = 87 + rng.uniform(0, 3, 25), 20 + rng.uniform(0, 2, 25)
    ax.scatter(x, y)
    labels = [ax.annotate(f"IQ4_NL+θ r{i} attn", (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
              for i, (xi, yi) in enumerate(zip(x, y))]
    fig.canvas.draw()
    assert overlapping_labels(ax, labels)  # as drawn before, they collide
    place_labels(ax, labels)
    assert overlapping_labels(ax, labels) == []
    plt.close(fig)
