"""`nkat-gguf convert`: read -> (bake) -> calibrate -> quantize -> theta -> write. Each step is its own module.

The output is llama.cpp's own quantization of the input, byte for byte, plus theta in metadata
(NKAT format v1), so a stock llama.cpp loads it as the plain quantized model.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nkat_gguf import __version__
from nkat_gguf.convert.calibrate import Calibration, calibrate
from nkat_gguf.convert.options import ConvertOptions, ConvertReport
from nkat_gguf.convert.selection import select_tensors
from nkat_gguf.engine.quantize import fallbacks, quantize_model, resolve_outtype
from nkat_gguf.engine.reference import supports_reference
from nkat_gguf.engine.runtime import check_loadable
from nkat_gguf.errors import InputError
from nkat_gguf.format import nkat
from nkat_gguf.format.atomic import check_writable_dir
from nkat_gguf.format.gguf_file import read_layout, write_with_metadata
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.format.imatrix import input_widths, missing_note, read_imatrix_file
from nkat_gguf.format.nkat import NkatTheta, check_gamma, theta_metadata
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.theta import LowRank, activation_scale, quantize_int8, theta_from_residual
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


def fit_theta(quantized: TensorSource, weights: Callable[[str], np.ndarray], names: list[str], rank: int,
              calibration: Calibration | None, progress: bool = True) -> dict[str, tuple[LowRank, float]]:
    """E = W_ref - dequant(W_q) per weight, then the (activation-weighted) rank-r SVD of E."""
    fits = {}
    for name in tqdm(names, desc=f"theta rank {rank}", unit="tensor", disable=not progress, leave=False):
        residual = weights(name) - quantized.dequantize(name)
        scale = activation_scale(calibration.mean_squares[name]) if calibration else None
        fit = theta_from_residual(residual, rank, scale)
        fits[name] = (fit.factors, fit.captured_energy)
    return fits


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
    check_gamma(opts.theta_gamma)
    check_loadable(input_path)
    check_so8t_options(opts.so8t, opts.imatrix, reuses_calibration=calibration is not None)
    outtype_name, ftype = resolve_outtype(opts.outtype, layout)
    source = TensorSource(input_path, layout)
    names = select_tensors(layout, opts.selective_layers)
    check_rank(source, names, opts.theta_rank)
    ref_source, weights = reference_weights(source, opts.reference, names)
    report = ConvertReport(str(input_path), str(output_path), outtype_name, opts.theta_rank, opts.theta_gamma,
                           "none", "none", input_bytes=input_path.stat().st_size)

    with tempfile.TemporaryDirectory(prefix=".nkat-convert-", dir=output_path.parent) as tmp:
        model_path, so8t = input_path, None
        if opts.so8t.enabled:  # everything below runs on the baked F32 copy (and baked reference)
            so8t = bake_step(opts.so8t, source, ref_source, Path(tmp))
            seconds.update(so8t.seconds)
            model_path, layout, ref_source = so8t.model.path, so8t.model.layout, so8t.reference
            weights = ref_source.dequantize

        needs_calibration = (opts.theta_calib == "activation" and opts.theta_rank > 0) or opts.imatrix == "auto"
        if needs_calibration and calibration is None:
            if supports_reference(ref_source.layout):
                t = time.perf_counter()
                calibration = calibrate(ref_source, weights, input_path, load_text(opts.calib_text, "calibration"),
                                        opts.progress)
                seconds["calibrate"] = time.perf_counter() - t
            else:
                report.notes.append(f"architecture {layout.architecture}: no PyTorch reference, so theta uses "
                                    "plain SVD and quantization has no importance matrix")
        calibration_for_theta = None if opts.theta_calib == "none" else calibration
        report.calibration = "activation" if calibration_for_theta else "none"
        imatrix, report.imatrix = load_imatrix_option(opts.imatrix, calibration, input_widths(layout), report.notes)

        quantized_path = Path(tmp) / "quantized.gguf"
        t = time.perf_counter()
        report.fallbacks = fallbacks(quantize_model(model_path, quantized_path, ftype, imatrix, opts.threads))
        seconds["quantize"] = time.perf_counter() - t

        t = time.perf_counter()
        fits = fit_theta(TensorSource(quantized_path), weights, names, opts.theta_rank, calibration_for_theta,
                         opts.progress) if opts.theta_rank > 0 else {}
        seconds["theta"] = time.perf_counter() - t
        theta = NkatTheta(opts.theta_rank, opts.theta_gamma, {n: quantize_int8(f) for n, (f, _) in fits.items()},
                          _provenance(input_path, opts, outtype_name, calibration, report.imatrix)
                          | (so8t.metadata() if so8t else {}))
        for name, (factors, captured) in fits.items():
            report.tensors[name] = {"rank": factors.rank, "captured_energy": round(captured, 6)}

        t = time.perf_counter()
        metadata = theta_metadata(theta)
        write_with_metadata(quantized_path, output_path, metadata, drop_prefixes=(nkat.PREFIX,))
        seconds["write"] = time.perf_counter() - t
    report.output_bytes = output_path.stat().st_size
    report.theta_metadata_bytes = sum(v.nbytes for v in metadata.values() if isinstance(v, np.ndarray))
    seconds["total"] = time.perf_counter() - t_start
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    if so8t is not None:
        report.so8t = so8t.summary()
        if opts.so8t.report_dir is not None:
            write_report(Path(opts.so8t.report_dir), report.as_dict())
    return report


def _check_paths(input_path: Path, output_path: Path, reference: Path | None) -> None:
    if output_path.exists() and output_path.is_dir():
        raise InputError(f"--output {output_path} is a directory; give a file name")
    check_writable_dir(output_path.parent.resolve())
    for other in (input_path, reference):
        if other is not None and output_path.exists() and output_path.resolve() == Path(other).resolve():
            raise InputError(f"--output would overwrite the input {other}; choose another file")
    if reference is not None and not Path(reference).is_file():
        raise InputError(f"no such file: {reference}")


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

