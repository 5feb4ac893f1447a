"""`nkat-gguf convert`: read -> (bake) -> calibrate -> quantize -> theta -> write. Each step is its own module.

The output is llama.cpp's own quantization of the input, byte for byte, plus theta in metadata
(NKAT format v1), so a stock llama.cpp loads it as the plain quantized model.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from tqdm import tqdm

from . import __version__
from .atomic import check_writable_dir
from .bake import BakePlan
from .bake_step import bake_step, check_so8t_options
from .calibrate import Calibration, calibrate
from .errors import InputError
from .gguf_file import read_layout, write_with_metadata
from .imatrix import input_widths, missing_note, read_imatrix_file
from .nkat_format import NkatTheta, theta_metadata
from .qc import write_report
from .quantize import quantize_model, resolve_outtype
from .selection import select_tensors
from .texts import load_text
from .theta import LowRank, activation_scale, quantize_int8, theta_from_residual
from .weights import TensorSource

ThetaCalib = Literal["activation", "none"]


@dataclass(frozen=True)
class ConvertOptions:
    input: Path
    output: Path
    outtype: str = "same"
    reference: Path | None = None
    theta_rank: int = 4
    theta_gamma: float = 0.97
    selective_layers: list[str] | None = None
    calib_text: Path | None = None
    theta_calib: ThetaCalib = "activation"
    imatrix: str = "auto"  # "auto": from the calibration; "none"; or a llama.cpp imatrix file
    threads: int = 0
    progress: bool = True
    so8t: str | BakePlan = "none"  # "hadamard", "random", "file:PATH.safetensors", or a ready plan (Python)
    so8t_seed: int | None = None
    so8t_heads: bool = False  # also R2 per layer on the value/output pair (hadamard/random)
    force: bool = False  # write even when SO8T QC fails; the file records it
    report_dir: Path | None = None  # SO8T QC report as so8t-qc.json and so8t-qc.md


@dataclass
class ConvertReport:
    input: str
    output: str
    outtype: str
    theta_rank: int
    theta_gamma: float
    calibration: str  # "activation" or "none"
    imatrix: str
    notes: list[str] = field(default_factory=list)
    input_bytes: int = 0
    output_bytes: int = 0
    theta_metadata_bytes: int = 0
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> {rank, captured_energy, ...}
    seconds: dict[str, float] = field(default_factory=dict)
    so8t: dict | None = None  # rotation and QC figures when --so8t baked one

    def as_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    from engine.runtime import check_gamma, check_loadable

    check_gamma(opts.theta_gamma)
    check_loadable(input_path)
    check_so8t_options(opts, reuses_calibration=calibration is not None)
    outtype_name, ftype = resolve_outtype(opts.outtype, layout)
    source = TensorSource(input_path, layout)
    names = select_tensors(layout, opts.selective_layers)
    check_rank(source, names, opts.theta_rank)
    ref_source, weights = reference_weights(source, opts.reference, names)
    report = ConvertReport(str(input_path), str(output_path), outtype_name, opts.theta_rank, opts.theta_gamma,
                           "none", "none", input_bytes=input_path.stat().st_size)

    with tempfile.TemporaryDirectory(prefix=".nkat-convert-", dir=output_path.parent) as tmp:
        model_path, so8t = input_path, None
        if opts.so8t != "none":  # everything below runs on the baked F32 copy (and baked reference)
            so8t = bake_step(opts, source, ref_source, Path(tmp))
            seconds.update(so8t.seconds)
            model_path, layout, ref_source = so8t.model.path, so8t.model.layout, so8t.reference
            weights = ref_source.dequantize

        needs_calibration = (opts.theta_calib == "activation" and opts.theta_rank > 0) or opts.imatrix == "auto"
        if needs_calibration and calibration is None:
            from engine.reference import supports_reference

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
        quantize_model(model_path, quantized_path, ftype, imatrix, opts.threads)
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
        write_with_metadata(quantized_path, output_path, metadata, drop_prefixes=("nkat.",))
        seconds["write"] = time.perf_counter() - t
    report.output_bytes = output_path.stat().st_size
    report.theta_metadata_bytes = sum(v.nbytes for v in metadata.values() if isinstance(v, np.ndarray))
    seconds["total"] = time.perf_counter() - t_start
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    if so8t is not None:
        report.so8t = so8t.summary()
        if opts.report_dir is not None:
            write_report(Path(opts.report_dir), report.as_dict())
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
        "nkat.source.sha256": source_sha,
        "nkat.source.name": input_path.name,
        "nkat.reference.sha256": sha256_file(opts.reference) if opts.reference else source_sha,
        "nkat.outtype": outtype,
        "nkat.calibration.method": "activation" if (calibration and opts.theta_calib == "activation") else "none",
        "nkat.imatrix": imatrix,
        "nkat.tool.version": __version__,
    }
    if calibration is not None:
        provenance["nkat.calibration.sha256"] = calibration.text_sha256
        provenance["nkat.calibration.tokens"] = calibration.tokens
        provenance["nkat.calibration.source"] = calibration.text_source
    return provenance

