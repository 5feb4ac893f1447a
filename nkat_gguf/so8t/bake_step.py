"""Convert's bake step: fold SO8T rotations into an F32 copy of the model, check it, hand it on.

Everything after this step (calibrate, quantize, θ) runs on the baked F32 files exactly as it would on
an input, so θ is fitted against the *rotated* reference. The copy is F32 throughout (tensors a trained
gate leaves alone are dequantized too) because QC compares F32 weights, and because quantizing from F32
is what llama.cpp does with an already-quantized input anyway. QC runs before anything is quantized;
when it fails, the step raises and convert writes nothing, unless --force.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import Keys

from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import TensorSpec, copy_metadata, write_gguf
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.so8t.bake import ALL_F32, F32, BakedModel, BakePlan, bake_rotations
from nkat_gguf.so8t.options import So8tOptions
from nkat_gguf.so8t.qc import (
    QCFailed,
    QCResult,
    forward_logits,
    judge,
    llama_logits,
    qc_text,
    qc_tokens,
    write_report,
)
from nkat_gguf.so8t.rotations import check_so8
from nkat_gguf.timing import StepTimes


@dataclass(frozen=True)
class BakeStep:
    model: TensorSource  # the baked input, all F32: what gets quantized
    reference: TensorSource  # the baked --reference, or `model`: what θ aims at
    plan: BakePlan
    baked_metadata: dict[str, Any]  # nkat.so8t.* written by the bake (mode, seed, orthogonality, det ...)
    qc: QCResult
    forced: bool  # QC failed and --force wrote anyway
    seconds: dict[str, float]
    report_dir: Path | None  # --report: where the QC report goes once convert has written its output

    def metadata(self) -> dict[str, Any]:
        """nkat.so8t.* for the output file: the bake's keys and the QC figures."""
        return {**self.baked_metadata, **self.qc.metadata(self.forced)}

    def summary(self) -> dict[str, Any]:
        """The `so8t` part of the convert report."""
        return {"mode": self.plan.mode, "seed": self.plan.seed, "heads": bool(self.plan.heads),
                "checkpoint": self.plan.checkpoint, "description": describe(self.plan), "forced": self.forced,
                "qc": self.qc.as_dict()}

    def write_report(self, report: Mapping[str, Any]) -> None:
        """With --report: so8t-qc.json and .md from convert's finished `report` (it names the output)."""
        if self.report_dir is not None:
            write_report(Path(self.report_dir), report)


def describe(plan: BakePlan) -> str:
    if plan.mode == "file" and plan.residual is None:
        return f"trained gates from {plan.checkpoint} on {len(plan.gates)} weights"
    heads = f" and R2 in {len(plan.heads)} layers" if plan.heads else ""
    if plan.mode == "file":
        return f"trained rotation from {plan.checkpoint}: residual R1 of {8 * len(plan.residual)}{heads}"
    seed = "no seed" if plan.seed is None else f"seed {plan.seed}"
    return f"{plan.mode} ({seed}): residual R1 of {8 * len(plan.residual)}{heads}"


def bake_for_convert(plan: BakePlan, opts: So8tOptions, source: TensorSource, reference: TensorSource,
              work_dir: Path) -> BakeStep:
    """convert's one call into SO8T: bake `plan` (from `check_so8t_options`) into `source` (and `reference`,
    if it is another file) in `work_dir`; QC before returning."""
    times = StepTimes()
    with times.step("bake"):
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
    return BakeStep(model, baked_reference, plan, so8t_keys, qc, not qc.passed, times.seconds, opts.report_dir)


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
