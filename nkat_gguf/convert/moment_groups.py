"""Second moments in groups of layers, so their memory is bounded by a budget rather than by the model.

Σxxᵀ of every input of a 70B llama is 129 GB; one layer's is 1.6 GB. The first calibration pass collects
E[x²] of every weight (the importance matrix) and Σxxᵀ of the first group of layers; when θ asks for a weight
of a later group, that group's pass runs (the same windows, only the group's weights observed: llama.cpp
stops each window's graph after the group's last weight) and the previous group's arrays are dropped first.
Consumers that fit weights in layer order (convert's `fit_weights`) run each pass once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from nkat_gguf.engine.calibrate.calibration import MAX_SECOND_MOMENT_WIDTH
from nkat_gguf.errors import InputError, NkatError
from nkat_gguf.format.gguf_file import GGUFLayout

_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB)$", re.IGNORECASE)
_LAYER = re.compile(r"^blk\.(\d+)\.")


def parse_memory(text: str, option: str = "--calib-memory") -> int:
    """`4GiB`, `512 MiB`: bytes; anything else, zero included, is one clear line."""
    match = _SIZE.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"{option} {text!r} is not a positive size; write it as KiB, MiB or GiB, e.g. 4GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def moment_bytes(layout: GGUFLayout, names: set[str]) -> dict[str, int]:
    """Upper bound of the float32 Σxxᵀ each weight can hold: 4·width² for a matrix at most
    MAX_SECOND_MOMENT_WIDTH wide, 0 otherwise. Weights that share an input (q/k/v, gate/up) share one
    array in practice; the bound counts each, so a group never exceeds its budget."""
    sizes = {}
    for t in layout.tensors:
        if t.name in names:
            width = t.shape[0]
            matrix = len(t.shape) == 2 or all(n == 1 for n in t.shape[2:])
            sizes[t.name] = 4 * width * width if matrix and width <= MAX_SECOND_MOMENT_WIDTH else 0
    return sizes


def layer_groups(layout: GGUFLayout, names: set[str], budget: int) -> list[set[str]]:
    """Consecutive layers (`blk.N.`) packed into groups of at most `budget` bytes of Σxxᵀ (a layer larger
    than the budget is its own group); weights outside the layers (the head) form the last group."""
    sizes = moment_bytes(layout, names)
    layers: dict[int, set[str]] = {}
    others: set[str] = set()
    for name in sizes:
        match = _LAYER.match(name)
        (layers.setdefault(int(match.group(1)), set()) if match else others).add(name)
    groups: list[set[str]] = []
    held = 0
    for index in sorted(layers):
        size = sum(sizes[n] for n in layers[index])
        if not groups or held + size > budget:
            groups.append(set())
            held = 0
        groups[-1] |= layers[index]
        held += size
    if others:
        if groups and held + sum(sizes[n] for n in others) <= budget:
            groups[-1] |= others
        else:
            groups.append(others)
    return groups


class GroupedMoments(Mapping[str, np.ndarray]):
    """E[xxᵀ] per weight, one group of layers in memory at a time.

    `expected`: the weights that get a second moment (a matrix input at most MAX_SECOND_MOMENT_WIDTH wide,
    seen by the first pass), known without running a pass so `in` never triggers one.
    `collect(group)` runs the calibration pass for a group and returns its second moments.
    """

    def __init__(self, groups: list[set[str]], expected: set[str], first: Mapping[str, np.ndarray],
                 collect: Callable[[set[str]], Mapping[str, np.ndarray]]):
        self.groups, self._expected, self._collect = groups, expected, collect
        self._group_of = {name: i for i, group in enumerate(groups) for name in group}
        self._loaded, self._held = 0, first
        self.passes = 1  # the first pass, which also gave E[x²]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._expected:
            raise KeyError(name)
        group = self._group_of[name]
        if group != self._loaded:
            self._held = {}  # freed before the next group is collected
            self._held = self._collect(self.groups[group])
            self._loaded = group
            self.passes += 1
        if name not in self._held:
            raise NkatError(f"the calibration pass of {name}'s layer group gave it no second moment; "
                            "llama.cpp's graph changed between passes")
        return self._held[name]

    def __contains__(self, name: object) -> bool:
        return name in self._expected

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._expected, key=lambda n: self._group_of[n]))

    def __len__(self) -> int:
        return len(self._expected)
