"""Point labels that never overlap: each label takes the first free spot of a fixed list of offsets.

Deterministic (same figure, same placement), so a plot can be checked by a test; no extra dependency.
Overlap is measured on the rendered text boxes (matplotlib's renderer), not estimated from font sizes.
"""

from __future__ import annotations

from itertools import combinations

from matplotlib.axes import Axes
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

_GAP = 2.0  # points between a label and its neighbours


def _offsets(width: float, height: float, ring: int) -> list[tuple[float, float]]:
    """Candidate offsets in points around the point, nearest first; `ring` moves them further out."""
    dy = (height + _GAP) * ring
    right, left = 4.0, -width - 4.0
    return [(right, 3 + dy), (right, -height - 3 - dy), (left, 3 + dy), (left, -height - 3 - dy)]


def place_labels(ax: Axes, labels: list[Annotation]) -> None:
    """Move each label (annotated in offset points) to the first offset whose box meets no placed box."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    points_per_pixel = 72.0 / fig.dpi
    placed: list[Bbox] = []
    for label in sorted(labels, key=lambda t: (t.xy[0], t.xy[1])):
        box = label.get_window_extent(renderer)
        width, height = box.width * points_per_pixel, box.height * points_per_pixel
        ring = 0
        while True:
            spot = next((xy for xy in _offsets(width, height, ring) if not _meets(label, xy, placed, renderer)), None)
            if spot is not None:
                label.set_position(spot)
                placed.append(label.get_window_extent(renderer).frozen())
                break
            ring += 1


def _meets(label: Annotation, offset: tuple[float, float], placed: list[Bbox], renderer: object) -> bool:
    label.set_position(offset)
    box = label.get_window_extent(renderer).padded(_GAP / 2)
    return any(box.overlaps(other) for other in placed)


def overlapping_labels(ax: Axes, labels: list[Annotation]) -> list[tuple[str, str]]:
    """Pairs of labels whose rendered boxes intersect (a test's check)."""
    renderer = ax.figure.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    return [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2) if box_a.overlaps(box_b)]
