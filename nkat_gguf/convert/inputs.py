"""convert's read step: once the options are checked, what the run reads before its first long step.

That is the calibration text (when a step reads it) and the sha256 of the input and the reference, which
the provenance records and the calibration cache keys on, so no file is hashed twice.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from nkat_gguf.convert.calib_text import calibration_text
from nkat_gguf.convert.checks import CheckedOptions
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.texts import Text


@dataclass(frozen=True)
class Inputs(CheckedOptions):
    """The checked options and what was read for them."""

    calib_text: Text | None  # loaded once, when a step reads it
    input_sha256: str
    reference_sha256: str

    def known_sha256(self, path: Path) -> str | None:
        """The sha256 already taken of `path` (the input or the reference), so no file is hashed twice."""
        known = {Path(self.opts.input).resolve(): self.input_sha256}
        if self.opts.reference is not None:
            known[Path(self.opts.reference).resolve()] = self.reference_sha256
        return known.get(Path(path).resolve())


def read_input(checked: CheckedOptions) -> Inputs:
    """The calibration text and the hashes the checked options ask for."""
    opts = checked.opts
    input_sha256 = sha256_file(opts.input)
    text = (calibration_text(opts.calib_text, checked.reference.path, opts.threads, opts.progress)
            if checked.reads_text else None)
    return Inputs(**{f.name: getattr(checked, f.name) for f in fields(CheckedOptions)}, calib_text=text,
                  input_sha256=input_sha256,
                  reference_sha256=sha256_file(opts.reference) if opts.reference else input_sha256)
