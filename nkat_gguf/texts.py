"""Calibration and evaluation text: real English nobody here wrote, fixed once and for all.

- `pydoc_data.topics` (CPython's own documentation, shipped with every CPython): the topics are taken
  in sorted key order; every fifth one (index 0, 5, 10, ...) is the calibration split, all others are
  the evaluation split. Topics repeat each other's sections (a third of the calibration paragraphs
  recur in other topics), so the evaluation split also drops every paragraph found in the calibration
  split or sharing a line of SHARED_LINE characters or more with it: the two never share a sentence.
- `licenses`: a second evaluation text of another kind, legal prose: the licence texts every Debian
  system ships in /usr/share/common-licenses (package base-files), in sorted file order. A gain that
  shows on pydoc but not here is a gain on text like the calibration text only.

`--text FILE` / `--calib-text FILE` replace any of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics
from typing import Literal

from nkat_gguf.errors import InputError

Split = Literal["calibration", "evaluation", "licenses"]
CALIBRATION_EVERY = 5
SHARED_LINE = 60  # a line this long found in both splits is shared text, not a common phrase
LICENSES_DIR = Path("/usr/share/common-licenses")
# The licence files of the second evaluation text; the other files there are older versions or links to these.
LICENSE_FILES = ("Apache-2.0", "Artistic", "GFDL-1.3", "GPL-3", "LGPL-2.1", "MPL-2.0")


@dataclass(frozen=True)
class Text:
    content: str
    source: str  # "pydoc_data.topics:evaluation" or a file path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()


def builtin_text(split: Split) -> Text:
    """The fixed texts described in the module docstring."""
    if split == "licenses":
        return _licenses_text()

    keys = sorted(topics)
    calibration = [topics[k] for i, k in enumerate(keys) if i % CALIBRATION_EVERY == 0]
    if split == "calibration":
        return Text("\n\n".join(calibration), f"pydoc_data.topics:{split}")
    seen = long_lines("\n".join(calibration)) | {p.strip() for t in calibration for p in t.split("\n\n")}
    evaluation = ["\n\n".join(p for p in topics[k].split("\n\n")
                            if p.strip() not in seen and not long_lines(p) & seen)
                  for i, k in enumerate(keys) if i % CALIBRATION_EVERY != 0]
    return Text("\n\n".join(t for t in evaluation if t), f"pydoc_data.topics:{split}")


def long_lines(text: str) -> set[str]:
    """The stripped lines of at least SHARED_LINE characters: what two texts that share prose have in common."""
    return {s for line in text.splitlines() if len(s := line.strip()) >= SHARED_LINE}


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


def _licenses_text() -> Text:
    missing = [name for name in LICENSE_FILES if not (LICENSES_DIR / name).is_file()]
    if missing:
        raise InputError(f"the second evaluation text needs {LICENSES_DIR}/{missing[0]} (Debian's base-files); "
                         "pass --text FILE instead")
    content = "\n\n".join((LICENSES_DIR / name).read_text(encoding="utf-8") for name in LICENSE_FILES)
    return Text(content, "licenses:" + ",".join(LICENSE_FILES))
