"""convert's SO8T options, and their checks: SO8T alone decides what its options may be.

convert's checks (nkat_gguf/convert/checks.py) call `check_so8t_options` once, before any work; what it
returns, the rotation plan, is all the bake step needs besides --force and --report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nkat_gguf.errors import InputError
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.so8t.bake import FILE_PREFIX, BakePlan, make_plan
from nkat_gguf.so8t.qc import check_report_dir


@dataclass(frozen=True)
class So8tOptions:
    """convert's SO8T options as one object: which rotation to bake and what to do when its QC fails."""

    mode: str | BakePlan = "none"  # "hadamard", "random", "file:PATH.safetensors", or a ready plan (Python)
    seed: int | None = None  # of the random rotation, or of random signs on the Hadamard blocks
    heads: bool = False  # also R2 per layer on the value/output pair (hadamard/random)
    force: bool = False  # write even when QC fails; the file records it
    report_dir: Path | None = None  # QC report as so8t-qc.json and so8t-qc.md

    @property
    def enabled(self) -> bool:
        return not (isinstance(self.mode, str) and self.mode == "none")


def check_so8t_options(opts: So8tOptions, source: TensorSource, imatrix: str,
                       reuses_calibration: bool) -> BakePlan | None:
    """The rotations to bake into `source` (None: no bake), or a one-line refusal before any long work:
    options that need --so8t or cannot go with it, a mode this model cannot take, a bad checkpoint."""
    if not opts.enabled:
        for given, flag in ((opts.seed is not None, "--so8t-seed"), (opts.heads, "--so8t-heads"),
                            (opts.force, "--force"), (opts.report_dir is not None, "--report")):
            if given:
                raise InputError(f"{flag} goes with --so8t hadamard, random or file:PATH; --so8t is none")
        return None
    if isinstance(opts.mode, str) and opts.mode.startswith(FILE_PREFIX) and opts.seed is not None:
        raise InputError("--so8t-seed goes with hadamard or random; trained gates (file:) are fixed")
    if imatrix not in ("auto", "none"):
        raise InputError("--imatrix FILE describes the inputs of the unrotated model; with --so8t use auto or none")
    if reuses_calibration:
        raise ValueError("a calibration of the unrotated model cannot be reused with --so8t")
    if opts.report_dir is not None:
        check_report_dir(Path(opts.report_dir))
    return opts.mode if isinstance(opts.mode, BakePlan) else make_plan(opts.mode, source, opts.seed, opts.heads)
