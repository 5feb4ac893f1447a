"""Calibration and evaluation text: CPython's own documentation, split once and for all.

`pydoc_data.topics` is real English nobody here wrote and ships with every CPython. The topics are
taken in sorted key order; every fifth one (index 0, 5, 10, ...) is the calibration split, all others
are the evaluation split, so the two never share a sentence. `--text FILE` replaces either.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import InputError

Split = Literal["calibration", "evaluation"]
CALIBRATION_EVERY = 5


@dataclass(frozen=True)
class Text:
    content: str
    source: str  # "pydoc_data.topics:evaluation" or a file path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()


def builtin_text(split: Split) -> Text:
    """The fixed split of `pydoc_data.topics` described in the module docstring."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    in_calibration = split == "calibration"
    chosen = [topics[k] for i, k in enumerate(keys) if (i % CALIBRATION_EVERY == 0) == in_calibration]
    return Text("\n\n".join(chosen), f"pydoc_data.topics:{split}")


def load_text(path: str | Path | None, split: Split) -> Text:
    """A UTF-8 file when given, else the built-in split."""
    if path is None:
        return builtin_text(split)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such text file: {p}")
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"text file is not UTF-8: {p} ({exc.reason} at byte {exc.start})") from None
    if not content.strip():
        raise InputError(f"text file is empty: {p}")
    return Text(content, str(p))
