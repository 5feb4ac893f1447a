"""Convert's bake step: fold SO8T rotations into an F32 copy of the model, check it, hand it on.

Everything after this step (calibrate, quantize, θ) runs on the baked F32 files exactly as it would on
an input, so θ is fitted against the *rotated* reference. The copy is F32 throughout (tensors a trained
gate leaves alone are dequantized too) because QC compares F32 weights, and because quantizing from F32
is what llama.cpp does with an already-quantized input anyway. QC runs before anything is quantized;
when it fails, the step raises and convert writes nothing, unless --force.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import Keys

from nkat_gguf.errors import InputError
from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import TensorSpec, copy_metadata, write_gguf
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.rotations import check_so8
from nkat_gguf.so8t.bake import ALL_F32, F32, FILE_PREFIX, BakedModel, BakePlan, bake_rotations, make_plan
from nkat_gguf.so8t.qc import (
    QCFailed,
    QCResult,
    check_report_dir,
    judge,
    llama_logits,
    qc_text,
    qc_tokens,
    forward_logits,
)
from nkat_gguf.timing import StepTimes


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


@dataclass(frozen=True)
class BakeStep:
    model: TensorSource  # the baked input, all F32: what gets quantized
    reference: TensorSource  # the baked --reference, or `model`: what θ aims at
    plan: BakePlan
    baked_metadata: dict[str, Any]  # nkat.so8t.* written by the bake (mode, seed, orthogonality, det ...)
    qc: QCResult
    forced: bool  # QC failed and --force wrote anyway
    seconds: dict[str, float]

    def metadata(self) -> dict[str, Any]:
        """nkat.so8t.* for the output file: the bake's keys and the QC figures."""
        return {**self.baked_metadata, **self.qc.metadata(self.forced)}

    def summary(self) -> dict[str, Any]:
        """The `so8t` part of the convert report."""
        return {"mode": self.plan.mode, "seed": self.plan.seed, "heads": bool(self.plan.heads),
                "checkpoint": self.plan.checkpoint, "description": describe(self.plan), "forced": self.forced,
                "qc": self.qc.as_dict()}


def describe(plan: BakePlan) -> str:
    if plan.mode == "file" and plan.residual is None:
        return f"trained gates from {plan.checkpoint} on {len(plan.gates)} weights"
    heads = f" and R2 in {len(plan.heads)} layers" if plan.heads else ""
    if plan.mode == "file":
        return f"trained rotation from {plan.checkpoint}: residual R1 of {8 * len(plan.residual)}{heads}"
    seed = "no seed" if plan.seed is None else f"seed {plan.seed}"
    return f"{plan.mode} ({seed}): residual R1 of {8 * len(plan.residual)}{heads}"


def check_so8t_options(opts: So8tOptions, imatrix: str, reuses_calibration: bool) -> None:
    """One-line refusals before any long work: options that need --so8t, or that cannot go with it."""
    if not opts.enabled:
        for given, flag in ((opts.seed is not None, "--so8t-seed"), (opts.heads, "--so8t-heads"),
                            (opts.force, "--force"), (opts.report_dir is not None, "--report")):
            if given:
                raise InputError(f"{flag} goes with --so8t hadamard, random or file:PATH; --so8t is none")
        return
    if isinstance(opts.mode, str) and opts.mode.startswith(FILE_PREFIX) and opts.seed is not None:
        raise InputError("--so8t-seed goes with hadamard or random; trained gates (file:) are fixed")
    if imatrix not in ("auto", "none"):
        raise InputError("--imatrix FILE describes the inputs of the unrotated model; with --so8t use auto or none")
    if reuses_calibration:
        raise ValueError("a calibration of the unrotated model cannot be reused with --so8t")
    if opts.report_dir is not None:
        check_report_dir(Path(opts.report_dir))


def bake_step(opts: So8tOptions, source: TensorSource, reference: TensorSource, work_dir: Path) -> BakeStep:
    """Bake `source` (and `reference`, if it is another file) into `work_dir`; QC before returning."""
    times = StepTimes()
    with times.step("bake"):
        plan = opts.mode if isinstance(opts.mode, BakePlan) else make_plan(opts.mode, source, opts.seed, opts.heads)
        baked = bake_rotations(source, plan)
        model = _write_f32(work_dir / "baked.gguf", source, baked)
    with times.step("qc"):
        qc = check_bake(source, plan, model.path, work_dir)
    if not qc.passed and not opts.force:
        raise QCFailed(f"SO8T QC failed ({describe(plan)}): {qc.summary()}; nothing written "
                       "(--force writes anyway)")
    baked_reference = model
    if reference is not source:
        with times.step("bake_reference"):
            baked_reference = _write_f32(work_dir / "baked-reference.gguf", reference,
                                         bake_rotations(reference, plan))
    so8t_keys = {k: v for k, v in baked.metadata.items() if k.startswith(nkat.SO8T_PREFIX)}
    return BakeStep(model, baked_reference, plan, so8t_keys, qc, not qc.passed, times.seconds)


def check_bake(source: TensorSource, plan: BakePlan, post: Path, work_dir: Path) -> QCResult:
    """QC of one bake. Residual rotations: llama.cpp on an F32 copy of `source` vs llama.cpp on `post`.
    Trained weight gates: the PyTorch forward with the gates applied online vs llama.cpp on `post`."""
    text = qc_text()
    tokens = qc_tokens(post, text)
    if plan.residual is None:
        z_pre, pre = forward_logits(source, tokens, plan.gates), "PyTorch forward with the gates applied online"
    else:
        pre_model = _write_f32(work_dir / "pre.gguf", source, _unchanged(source))
        z_pre, pre = llama_logits(pre_model.path, tokens), "llama.cpp on an F32 copy of the input"
        pre_model.path.unlink()
    return judge(plan.mode, pre, text, z_pre, llama_logits(post, tokens), *check_so8(plan.blocks()))


def _unchanged(source: TensorSource) -> BakedModel:
    """The model as it is, in BakedModel form, so the F32 writer serves both sides of QC."""
    metadata = copy_metadata(source.layout, drop_prefixes=("GGUF.", nkat.PREFIX, Keys.General.ALIGNMENT))
    specs = [TensorSpec(t.name, source.numpy_shape(t.name), t.type) for t in source.layout.tensors]
    return BakedModel(metadata, specs, {})


def _write_f32(dst: Path, source: TensorSource, baked: BakedModel) -> TensorSource:
    """`baked` with every tensor F32: tensors it computed are written as they are, all others dequantized."""
    specs = [dataclasses.replace(spec, type=F32) for spec in baked.specs]
    computed = {spec.name for spec in baked.specs if spec.type == F32 and spec.name in baked.recipes}

    def produce(spec: TensorSpec) -> np.ndarray:
        return baked.produce(spec) if spec.name in computed else source.dequantize(spec.name)

    write_gguf(dst, {**baked.metadata, Keys.General.FILE_TYPE: ALL_F32}, specs, produce)
    return TensorSource(dst)
