"""`nkat-gguf convert`: check -> read -> (bake) -> calibrate -> quantize -> θ -> write, one function per step.

The calibration comes before quantization because its statistics are llama.cpp's importance matrix.
The steps' modules: checks.py (every option, before any work), inputs.py, SO8T's bake step (nkat_gguf.so8t,
only when --so8t asks for one), calibrate.py, engine/llama/quantize.py, theta_fit.py (allocate.py under a
budget), write.py. The output is llama.cpp's own quantization of the input, byte for byte, plus θ
in metadata (NKAT format v2), so a stock llama.cpp loads it as the plain quantized model.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from nkat_gguf.convert.allocate import allocate_mix, allocate_theta
from nkat_gguf.convert.calibrate import DEFAULT_CALIB_TOKENS, Calibration, calibrate
from nkat_gguf.convert.checks import check_options
from nkat_gguf.convert.inputs import Inputs, read_input
from nkat_gguf.convert.memory import return_freed_memory
from nkat_gguf.convert.options import ConvertOptions, ConvertReport
from nkat_gguf.convert.theta_fit import WeightFit, fit_weights, replace_tensors
from nkat_gguf.convert.theta_train import TrainSettings, train_theta, trained_figures
from nkat_gguf.convert.write import provenance, write_temperature, write_theta
from nkat_gguf.engine.llama.quantize import check_types, fallbacks, quantize_model
from nkat_gguf.errors import NkatError
from nkat_gguf.format.atomic import work_dir
from nkat_gguf.format.gguf_file import GGUFLayout
from nkat_gguf.format.imatrix import input_widths, missing_note, read_imatrix_file
from nkat_gguf.format.nkat import NkatTheta
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.so8t import BakeStep, bake_for_convert
from nkat_gguf.timing import StepTimes


@dataclass(frozen=True)
class Model:
    """What the steps after the bake convert: the input (or its baked F32 copy) and W_ref to fit θ on."""

    path: Path
    layout: GGUFLayout
    reference: TensorSource


@dataclass(frozen=True)
class Quantized:
    """llama.cpp's quantization of the model, and how its importance matrix was obtained (for provenance)."""

    path: Path
    imatrix: dict[str, np.ndarray] | None
    imatrix_source: str
    fallbacks: dict[str, str]


@dataclass(frozen=True)
class Theta:
    """The fitted θ and the quantized file it goes with (llama.cpp's, or the joint rounds' requantization)."""

    fits: dict[str, WeightFit]
    quantized: Path
    allocation: dict | None
    types: dict[str, str] | None = None  # under --byte-budget: the weights given another type than the base's
    seconds: dict[str, float] = field(default_factory=dict)  # under a budget: the θ step's own steps


def convert(opts: ConvertOptions, calibration: Calibration | None = None) -> ConvertReport:
    """Run the whole pipeline; `calibration` may be passed in to reuse one across several converts
    (not with so8t: a calibration of the unrotated model does not describe the rotated one)."""
    times = StepTimes()
    opts = opts.resolved()
    return_freed_memory()
    checked = None
    try:
        with times.step("total"):
            checked = check_options(opts, calibration)
            report, so8t = _steps(read_input(checked), calibration, times)
    except MemoryError:  # the work directory and the atomic output are gone by now: nothing is left behind
        step = " / ".join(times.current[1:]) or "read"
        needed = "" if checked is None else (f"; by docs/CALIBRATION.md's formula it needs about "
                                             f"{checked.memory.peak / (1 << 30):.2f} GiB ({checked.memory.describe()})")
        raise NkatError(f"convert ran out of memory in its {step} step{needed}") from None
    report.seconds = times.rounded()
    report.peak_resident_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if so8t is not None:
        so8t.write_report(report.as_dict())
    return report


def _steps(inputs: Inputs, calibration: Calibration | None, times: StepTimes) -> tuple[ConvertReport, BakeStep | None]:
    """bake -> calibrate -> quantize -> θ -> write (-> temperature), each step timed."""
    opts = inputs.opts
    report = ConvertReport(str(opts.input), str(opts.output), inputs.outtype, opts.theta_rank, opts.gamma,
                           "none", opts.theta_fit, "none", input_bytes=Path(opts.input).stat().st_size)
    with work_dir(Path(opts.output).parent, "convert") as tmp:
        model, so8t = bake(inputs, Path(tmp))
        if so8t is not None:
            times.seconds.update(so8t.seconds)
        if inputs.needs_calibration and calibration is None:  # llama.cpp evaluates the weights θ aims at
            with times.step("calibrate"):
                calibration = calibrate_model(inputs, model, report.notes)
        for_theta = calibration_for_theta(inputs, calibration, report.notes)
        imatrix, imatrix_source = load_imatrix(inputs, model, calibration, report.notes)
        with times.step("quantize"):
            quantized = quantize(inputs, model, imatrix, imatrix_source, Path(tmp))
        with times.step("theta"):
            theta = fit_theta(inputs, model, quantized, for_theta, Path(tmp))
            if opts.theta_train != "none" and theta.fits:
                trained = train_theta(TrainSettings.of(opts), model.reference, theta.quantized, theta.fits,
                                      opts.gamma, inputs.calib_text, opts.progress)
                theta, report.theta_train = replace(theta, fits=trained.fits), trained.summary
            record = NkatTheta(opts.gamma, {n: f.theta for n, f in theta.fits.items()},
                               provenance(inputs, calibration, quantized.imatrix_source, theta.allocation,
                                          theta.types, so8t, report.theta_train))
        times.seconds.update(theta.seconds)
        written = Path(tmp) / "with-theta.gguf" if opts.calibrate_temperature else Path(opts.output)
        with times.step("write"):
            metadata = write_theta(theta.quantized, written, record)
        if opts.calibrate_temperature:
            with times.step("temperature"):
                report.temperature = asdict(write_temperature(written, Path(opts.output), inputs))
    report.calibration = "activation" if for_theta else "none"
    _fill_report(report, quantized, theta, metadata, so8t)
    return report, so8t


def bake(inputs: Inputs, tmp: Path) -> tuple[Model, BakeStep | None]:
    """The model to convert: the input, or with --so8t its rotated F32 copy (and a rotated reference)."""
    if inputs.so8t is None:
        return Model(inputs.source.path, inputs.layout, inputs.reference), None
    so8t = bake_for_convert(inputs.so8t, inputs.opts.so8t, inputs.source, inputs.reference, tmp)
    return Model(so8t.model.path, so8t.model.layout, so8t.reference), so8t


def calibrate_model(inputs: Inputs, model: Model, notes: list[str]) -> Calibration:
    """The input statistics of W_ref's model on the calibration text (llama.cpp's own graph)."""
    opts = inputs.opts
    path = model.reference.path
    calibration = calibrate(path, inputs.calib_text, opts.calib_tokens, threads=opts.threads, progress=opts.progress,
                            save_imatrix=opts.save_imatrix, second_moments=opts.theta_fit == "whiten",
                            model_sha256=inputs.known_sha256(path), memory=inputs.calib_memory)
    if calibration.moment_groups > 1:
        notes.append(f"second moments in {calibration.moment_groups} groups of layers within --calib-memory "
                     f"{opts.calib_memory}: one calibration pass per group")
    if opts.calib_tokens is None and calibration.tokens < DEFAULT_CALIB_TOKENS:
        notes.append(f"the calibration text holds {calibration.tokens} tokens in whole windows, "
                     f"fewer than the default {DEFAULT_CALIB_TOKENS}; calibrated on those")
    return calibration


def calibration_for_theta(inputs: Inputs, calibration: Calibration | None, notes: list[str]) -> Calibration | None:
    """The calibration θ's fit weighs the residual with (none with --theta-calib none)."""
    opts = inputs.opts
    if opts.theta_calib == "none" or calibration is None:
        return None
    if opts.theta_fit == "whiten" and opts.theta_rank > 0:
        wide = [n for n in inputs.names if n not in calibration.second_moments]
        if wide:
            notes.append(f"{len(wide)} weights have no E[x xᵀ] in the calibration: diagonal fit there")
    return calibration


def load_imatrix(inputs: Inputs, model: Model, calibration: Calibration | None,
                 notes: list[str]) -> tuple[dict[str, np.ndarray] | None, str]:
    """The importance matrix to quantize with (--imatrix auto, none or a file), and how it was obtained."""
    option = inputs.opts.imatrix
    widths = input_widths(model.layout)
    if option == "none":
        return None, "none"
    if option == "auto":
        if calibration is None:
            return None, "none (no calibration)"
        return {k: v for k, v in calibration.mean_squares.items() if k in widths}, "calibration"
    path = Path(option)
    imatrix = read_imatrix_file(path, widths)
    if note := missing_note(path, imatrix, widths):
        notes.append(note)
    return imatrix, f"file:{path.name}"


def quantize(inputs: Inputs, model: Model, imatrix: dict[str, np.ndarray] | None, imatrix_source: str,
             tmp: Path) -> Quantized:
    """llama.cpp's quantization of the model to the output type, with the importance matrix."""
    path = tmp / "quantized.gguf"
    log = quantize_model(model.path, path, inputs.ftype, imatrix, inputs.opts.threads, inputs.tensor_types)
    check_types(path, inputs.tensor_types)
    return Quantized(path, imatrix, imatrix_source, fallbacks(log))


def fit_theta(inputs: Inputs, model: Model, quantized: Quantized, calibration: Calibration | None,
              tmp: Path) -> Theta:
    """θ per weight: under --byte-budget the allocation's types and ranks, under --theta-budget its ranks, else
    --theta-rank everywhere (0: no θ)."""
    opts = inputs.opts
    weights = model.reference.dequantize
    if inputs.byte_budget is not None:
        mix = allocate_mix(model.path, quantized.path, inputs.ftype, quantized.imatrix, weights, inputs.names,
                           calibration, inputs.calib_text, inputs.byte_budget, inputs.theta_weights, opts.gamma,
                           inputs.fit, tmp, opts.threads, opts.progress, speed_price=opts.speed_price)
        return Theta(mix.fits, mix.path, mix.summary(), mix.upgrades, mix.seconds)
    if inputs.budget is not None:
        allocation = allocate_theta(quantized.path, weights, inputs.names, calibration, inputs.calib_text,
                                    inputs.budget, inputs.theta_weights, opts.gamma, inputs.fit, tmp,
                                    opts.threads, opts.progress)
        return Theta(allocation.fits, quantized.path, allocation.summary(), seconds=allocation.seconds)
    if opts.theta_rank == 0:
        return Theta({}, quantized.path, None)
    fits, replaced = fit_weights(TensorSource(quantized.path), weights, inputs.names, opts.theta_rank, calibration,
                                 inputs.fit, quantized.imatrix, opts.progress)
    if not replaced:
        return Theta(fits, quantized.path, None)
    jointly = tmp / "joint.gguf"  # joint rounds: the requantized weights that beat llama.cpp's own
    replace_tensors(quantized.path, jointly, replaced)
    return Theta(fits, jointly, None)


def _fill_report(report: ConvertReport, quantized: Quantized, theta: Theta, metadata: dict[str, object],
                 so8t: BakeStep | None) -> None:
    report.imatrix = quantized.imatrix_source
    report.fallbacks = quantized.fallbacks
    report.allocation = theta.allocation
    report.types = theta.types
    if theta.allocation is not None:
        report.theta_rank = max((f.theta.rank for f in theta.fits.values()), default=0)
    for name, f in theta.fits.items():
        report.tensors[name] = {"rank": f.theta.rank, "captured_energy": round(f.captured_energy, 6),
                                "expected_output_error": f.error, "round": f.round}
        if report.theta_train is not None:  # the closed form's figures no longer describe the trained factors
            report.tensors[name] |= trained_figures(name, report.theta_train)
    report.output_bytes = Path(report.output).stat().st_size
    report.theta_metadata_bytes = sum(v.nbytes for v in metadata.values() if isinstance(v, np.ndarray))
    if so8t is not None:
        report.so8t = so8t.summary()
