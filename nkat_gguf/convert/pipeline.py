"""`nkat-gguf convert`: read -> (bake) -> calibrate -> quantize -> theta -> write. Each step is its own module.

The output is llama.cpp's own quantization of the input, byte for byte, plus theta in metadata
(NKAT format v2), so a stock llama.cpp loads it as the plain quantized model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from nkat_gguf import __version__
from nkat_gguf.convert.allocate import allocate_theta
from nkat_gguf.convert.calibrate import DEFAULT_CALIB_TOKENS, Calibration, calibrate
from nkat_gguf.convert.options import ConvertOptions, ConvertReport
from nkat_gguf.convert.selection import select_tensors
from nkat_gguf.convert.theta_fit import FIT_METHODS, FitSettings, fit_weights, replace_tensors
from nkat_gguf.engine.temperature import CalibrationSettings, fit_llm_temperature
from nkat_gguf.engine.quantize import fallbacks, quantize_model, resolve_outtype
from nkat_gguf.engine.runtime import NkatRuntime, RuntimeOptions, check_loadable
from nkat_gguf.errors import InputError
from nkat_gguf.format import nkat
from nkat_gguf.format.atomic import check_writable_dir, work_dir
from nkat_gguf.format.gguf_file import read_layout, write_with_metadata
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.format.imatrix import input_widths, missing_note, read_imatrix_file
from nkat_gguf.format.nkat import CalibratedTemperature, NkatTheta, check_gamma, theta_metadata
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.allocation import ThetaBudget, check_max_weights, parse_budget
from nkat_gguf.math.theta import quantize_int8
from nkat_gguf.so8t.bake_step import bake_step, check_so8t_options
from nkat_gguf.so8t.qc import write_report
from nkat_gguf.texts import load_text


def reference_weights(input_source: TensorSource, reference: Path | None, names: list[str]) -> tuple[
        TensorSource, Callable[[str], np.ndarray]]:
    """W_ref: the input dequantized, or the same-named weights of a higher-precision GGUF."""
    if reference is None:
        return input_source, input_source.dequantize
    ref = TensorSource(reference)
    if ref.layout.get("general.architecture") != input_source.layout.get("general.architecture"):
        raise InputError(f"--reference {reference.name} is a different architecture from the input")
    for name in [t.name for t in input_source.layout.tensors]:
        if name not in ref:
            raise InputError(f"--reference {reference.name} has no tensor {name}; it must be the same model")
        if ref.numpy_shape(name) != input_source.numpy_shape(name):
            raise InputError(f"--reference {reference.name}: {name} is {ref.numpy_shape(name)}, "
                             f"input has {input_source.numpy_shape(name)}")
    return ref, ref.dequantize


def check_rank(source: TensorSource, names: list[str], rank: int) -> None:
    if rank < 0:
        raise InputError(f"--theta-rank must be >= 0, got {rank}")
    for name in names:
        smallest = min(source.numpy_shape(name))
        if rank > smallest:
            raise InputError(f"--theta-rank {rank} is larger than {name}'s smaller dimension {smallest}")


def check_fit(opts: ConvertOptions) -> FitSettings:
    if opts.theta_fit not in FIT_METHODS:
        raise InputError(f"--theta-fit must be one of {', '.join(FIT_METHODS)}, got {opts.theta_fit!r}")
    if opts.theta_damping is not None and not 0 <= opts.theta_damping <= 10:
        raise InputError(f"--theta-damping must lie in [0, 10], got {opts.theta_damping}")
    if not 1 <= opts.theta_rounds <= 10:
        raise InputError(f"--theta-rounds must lie in [1, 10], got {opts.theta_rounds}")
    return FitSettings(opts.theta_fit, opts.theta_damping, opts.theta_rounds)


def load_imatrix_option(option: str, calibration: Calibration | None, widths: dict[str, int],
                        notes: list[str]) -> tuple[dict[str, np.ndarray] | None, str]:
    """The importance matrix to quantize with, and how it was obtained (for provenance)."""
    if option == "none":
        return None, "none"
    if option == "auto":
        if calibration is None:
            return None, "none (no calibration)"
        return {k: v for k, v in calibration.mean_squares.items() if k in widths}, "calibration"
    imatrix = read_imatrix_file(Path(option), widths)
    if note := missing_note(Path(option), imatrix, widths):
        notes.append(note)
    return imatrix, f"file:{Path(option).name}"


def convert(opts: ConvertOptions, calibration: Calibration | None = None) -> ConvertReport:
    """Run the whole pipeline; `calibration` may be passed in to reuse one across several converts
    (not with so8t: a calibration of the unrotated model does not describe the rotated one)."""
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    input_path, output_path = Path(opts.input), Path(opts.output)
    layout = read_layout(input_path)
    _check_paths(input_path, output_path, opts.reference)
    if opts.save_imatrix is not None:
        _check_imatrix_path(Path(opts.save_imatrix), input_path, output_path, calibration)
    check_gamma(opts.theta_gamma)
    check_loadable(input_path)
    check_so8t_options(opts.so8t, opts.imatrix, reuses_calibration=calibration is not None)
    if opts.imatrix not in ("auto", "none"):  # a bad file fails now, not after the calibration
        read_imatrix_file(Path(opts.imatrix), input_widths(layout))
    outtype_name, ftype = resolve_outtype(opts.outtype, layout)
    source = TensorSource(input_path, layout)
    names = select_tensors(layout, opts.selective_layers)
    check_rank(source, names, opts.theta_rank)
    fit_settings = check_fit(opts)
    budget = check_budget_options(opts, names, input_path.stat().st_size)
    ref_source, weights = reference_weights(source, opts.reference, names)
    report = ConvertReport(str(input_path), str(output_path), outtype_name, opts.theta_rank, opts.theta_gamma,
                           "none", opts.theta_fit, "none", input_bytes=input_path.stat().st_size)

    with work_dir(output_path.parent, "convert") as tmp:
        model_path, so8t = input_path, None
        if opts.so8t.enabled:  # everything below runs on the baked F32 copy (and baked reference)
            so8t = bake_step(opts.so8t, source, ref_source, Path(tmp))
            seconds.update(so8t.seconds)
            model_path, layout, ref_source = so8t.model.path, so8t.model.layout, so8t.reference
            weights = ref_source.dequantize

        wants_theta = opts.theta_rank > 0 or budget is not None
        needs_calibration = ((opts.theta_calib == "activation" and wants_theta) or opts.imatrix == "auto"
                             or opts.save_imatrix is not None)
        if needs_calibration and calibration is None:  # llama.cpp evaluates the weights theta aims at
            t = time.perf_counter()
            calibration = calibrate(ref_source.path, load_text(opts.calib_text, "calibration"), opts.calib_tokens,
                                    threads=opts.threads, progress=opts.progress, save_imatrix=opts.save_imatrix,
                                    second_moments=opts.theta_fit == "whiten")
            seconds["calibrate"] = time.perf_counter() - t
            if opts.calib_tokens is None and calibration.tokens < DEFAULT_CALIB_TOKENS:
                report.notes.append(f"the calibration text holds {calibration.tokens} tokens in whole windows, "
                                    f"fewer than the default {DEFAULT_CALIB_TOKENS}; calibrated on those")
        calibration_for_theta = None if opts.theta_calib == "none" else calibration
        report.calibration = "activation" if calibration_for_theta else "none"
        if calibration_for_theta and opts.theta_fit == "whiten" and opts.theta_rank > 0:
            wide = [n for n in names if n not in calibration_for_theta.second_moments]
            if wide:
                report.notes.append(f"{len(wide)} weights have no E[x xᵀ] in the calibration: diagonal fit there")
        imatrix, report.imatrix = load_imatrix_option(opts.imatrix, calibration, input_widths(layout), report.notes)

        quantized_path = Path(tmp) / "quantized.gguf"
        t = time.perf_counter()
        report.fallbacks = fallbacks(quantize_model(model_path, quantized_path, ftype, imatrix, opts.threads))
        seconds["quantize"] = time.perf_counter() - t

        t = time.perf_counter()
        replaced: dict[str, np.ndarray] = {}
        if budget is not None:
            allocation = allocate_theta(quantized_path, weights, names, calibration_for_theta,
                                        load_text(opts.calib_text, "calibration"), budget, opts.theta_max_weights,
                                        opts.theta_gamma, fit_settings, Path(tmp), opts.threads, opts.progress)
            fits, report.allocation = allocation.fits, allocation.summary()
            report.theta_rank = max((f.factors.rank for f in fits.values()), default=0)
        elif opts.theta_rank > 0:
            fits, replaced = fit_weights(TensorSource(quantized_path), weights, names, opts.theta_rank,
                                         calibration_for_theta, fit_settings, imatrix, opts.progress)
        else:
            fits = {}
        if replaced:  # joint rounds: the requantized weights that beat llama.cpp's own
            jointly = Path(tmp) / "joint.gguf"
            replace_tensors(quantized_path, jointly, replaced)
            quantized_path = jointly
        seconds["theta"] = time.perf_counter() - t
        theta = NkatTheta(opts.theta_gamma, {n: quantize_int8(f.factors) for n, f in fits.items()},
                          _provenance(input_path, opts, outtype_name, calibration, report.imatrix)
                          | _allocation_provenance(report.allocation) | (so8t.metadata() if so8t else {}))
        for name, f in fits.items():
            report.tensors[name] = {"rank": f.factors.rank, "captured_energy": round(f.captured_energy, 6),
                                    "expected_output_error": f.error, "round": f.round}

        t = time.perf_counter()
        metadata = theta_metadata(theta)
        written = Path(tmp) / "with-theta.gguf" if opts.calibrate_temperature else output_path
        write_with_metadata(quantized_path, written, metadata, drop_prefixes=(nkat.PREFIX,))
        seconds["write"] = time.perf_counter() - t
        if opts.calibrate_temperature:
            t = time.perf_counter()
            fitted = _fit_temperature(written, opts)
            write_with_metadata(written, output_path, fitted.metadata())
            report.temperature = asdict(fitted)
            seconds["temperature"] = time.perf_counter() - t
    report.output_bytes = output_path.stat().st_size
    report.theta_metadata_bytes = sum(v.nbytes for v in metadata.values() if isinstance(v, np.ndarray))
    seconds["total"] = time.perf_counter() - t_start
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    if so8t is not None:
        report.so8t = so8t.summary()
        if opts.so8t.report_dir is not None:
            write_report(Path(opts.so8t.report_dir), report.as_dict())
    return report


def check_budget_options(opts: ConvertOptions, names: list[str], model_bytes: int) -> ThetaBudget | None:
    """--theta-budget / --theta-max-weights, refused in one line each before any work is done."""
    if opts.theta_budget is None:
        if opts.theta_max_weights is not None:
            raise InputError("--theta-max-weights needs --theta-budget (it caps how many weights the budget spreads over)")
        return None
    if opts.theta_rank == 0:
        raise InputError("--theta-budget asks for theta but --theta-rank 0 asks for none; give one of them")
    budget = parse_budget(opts.theta_budget, model_bytes)
    check_max_weights(opts.theta_max_weights, len(names))
    return budget


def _allocation_provenance(allocation: dict | None) -> dict[str, object]:
    if allocation is None:
        return {nkat.ALLOCATION_METHOD: "uniform"}
    sensitivity = {k: round(v["sensitivity"], 9) for k, v in allocation["sensitivity"].items()}
    out: dict[str, object] = {nkat.ALLOCATION_METHOD: "budget", nkat.ALLOCATION_BUDGET: allocation["budget_bytes"],
                              nkat.ALLOCATION_SENSITIVITY: json.dumps(sensitivity, sort_keys=True)}
    if allocation["max_weights"] is not None:
        out[nkat.ALLOCATION_MAX_WEIGHTS] = allocation["max_weights"]
    return out


TEMPERATURE_CHUNKS = 4  # convert fits on twice qc calibration's default: the result stays in the file


def _fit_temperature(model: Path, opts: ConvertOptions) -> CalibratedTemperature:
    """T minimising NLL of the written model (theta at its γ) on the calibration text (engine.temperature)."""
    settings = CalibrationSettings(calib_chunks=TEMPERATURE_CHUNKS, progress=opts.progress)
    options = RuntimeOptions(n_ctx=settings.n_ctx, n_batch=settings.n_ctx, n_threads=opts.threads or None)
    with NkatRuntime(model, options) as runtime:
        return fit_llm_temperature(runtime.llm, load_text(opts.calib_text, "calibration"), settings, runtime.gamma)


def _check_paths(input_path: Path, output_path: Path, reference: Path | None) -> None:
    if output_path.exists() and output_path.is_dir():
        raise InputError(f"--output {output_path} is a directory; give a file name")
    check_writable_dir(output_path.parent.resolve())
    for other in (input_path, reference):
        if other is not None and output_path.exists() and output_path.resolve() == Path(other).resolve():
            raise InputError(f"--output would overwrite the input {other}; choose another file")
    if reference is not None and not Path(reference).is_file():
        raise InputError(f"no such file: {reference}")


def _check_imatrix_path(path: Path, input_path: Path, output_path: Path, calibration: Calibration | None) -> None:
    if calibration is not None:
        raise InputError("--save-imatrix writes convert's own calibration; it cannot be combined with a passed-in one")
    if path.exists() and path.is_dir():
        raise InputError(f"--save-imatrix {path} is a directory; give a file name")
    check_writable_dir(path.parent.resolve())
    for other, what in ((input_path, "the input"), (output_path, "--output")):
        if path.resolve() == Path(other).resolve():
            raise InputError(f"--save-imatrix would overwrite {what} {other}; choose another file")


def _provenance(input_path: Path, opts: ConvertOptions, outtype: str, calibration: Calibration | None,
                imatrix: str) -> dict[str, object]:
    source_sha = sha256_file(input_path)
    provenance: dict[str, object] = {
        nkat.SOURCE_SHA256: source_sha,
        nkat.SOURCE_NAME: input_path.name,
        nkat.REFERENCE_SHA256: sha256_file(opts.reference) if opts.reference else source_sha,
        nkat.OUTTYPE: outtype,
        nkat.CALIBRATION_METHOD: "activation" if (calibration and opts.theta_calib == "activation") else "none",
        nkat.IMATRIX: imatrix,
        nkat.TOOL_VERSION: __version__,
    }
    if calibration is not None:
        provenance[nkat.CALIBRATION_SHA256] = calibration.text_sha256
        provenance[nkat.CALIBRATION_TOKENS] = calibration.tokens
        provenance[nkat.CALIBRATION_SOURCE] = calibration.text_source
    return provenance

