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


# Prompts of `qc longtext`'s greedy generations, written for this project: three kinds of long-form
# writing (an explanation of science, a proof, an implementation) whose continuations drift or loop
# in different ways when a quantized model degrades.
LONG_PROMPTS = {
    "scientific_explanation": (
        "Why the sky is blue: an explanation for curious readers.\n\n"
        "Sunlight looks white, but it is a mixture of every visible colour, from red light with long "
        "wavelengths to violet light with short ones. When this light enters the atmosphere it meets "
        "molecules of nitrogen and oxygen that are far smaller than its wavelength. Such small particles "
        "scatter light in all directions, and they scatter short wavelengths much more strongly than long "
        "ones: the effect grows with the inverse fourth power of the wavelength, so blue light is scattered "
        "several times more than red. To understand why the sky is blue rather than violet, we first need to"
    ),
    "mathematical_proof": (
        "Theorem. There are infinitely many prime numbers.\n\n"
        "Proof. We argue by contradiction. Suppose that there are only finitely many primes, and list them "
        "all as p1, p2, ..., pn. Consider the number N = p1 * p2 * ... * pn + 1, one more than the product "
        "of every prime on the list. N is larger than 1, so it has at least one prime factor q. Every prime "
        "is on our list, so q must be one of p1, ..., pn, and therefore q divides the product p1 * ... * pn. "
        "Since q divides both N and the product, it also divides their difference, which is"
    ),
    "technical_implementation": (
        "Implementing a least-recently-used (LRU) cache in Python.\n\n"
        "An LRU cache keeps a fixed number of entries and, when it is full, evicts the entry that was used "
        "least recently. Both lookups and insertions should take constant time. The classic design combines "
        "two structures: a dictionary that maps each key to a node, and a doubly linked list that orders the "
        "nodes from most to least recently used. On every access we move the node to the front of the list; "
        "on insertion into a full cache we remove the node at the back. We start with the node class:\n\n"
        "class Node:\n    def __init__(self, key, value):\n"
    ),
}
