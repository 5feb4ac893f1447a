"""convert's write step: θ and its provenance into the quantized model's metadata, then the fitted temperature.

The tensors are the quantized file's, byte for byte; only metadata is added (NKAT format v2), so a
stock llama.cpp loads the output as the plain quantized model.
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf.constants import GGUFValueType

from nkat_gguf import __version__
from nkat_gguf.convert.calibrate import Calibration
from nkat_gguf.convert.inputs import Inputs
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.engine.measure.temperature import CalibrationSettings, fit_llm_temperature
from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import Value, write_with_metadata
from nkat_gguf.format.nkat import CalibratedTemperature, NkatTheta, theta_metadata
from nkat_gguf.so8t import BakeStep

TEMPERATURE_CHUNKS = 4  # convert fits on twice qc calibration's default: the result stays in the file


def write_theta(quantized: Path, output: Path, theta: NkatTheta) -> dict[str, object]:
    """`output` = `quantized` with θ's keys (any nkat.* keys it had dropped); the metadata written."""
    metadata = theta_metadata(theta)
    write_with_metadata(quantized, output, metadata, drop_prefixes=(nkat.PREFIX,))
    return metadata


def write_temperature(model: Path, output: Path, inputs: Inputs) -> CalibratedTemperature:
    """`output` = `model` with the temperature T fitted on the calibration text (θ at its γ) stored."""
    settings = CalibrationSettings(calib_chunks=TEMPERATURE_CHUNKS, progress=inputs.opts.progress)
    options = RuntimeOptions(n_ctx=settings.n_ctx, n_batch=settings.n_ctx, n_threads=inputs.opts.threads or None)
    with NkatRuntime(model, options) as runtime:
        fitted = fit_llm_temperature(runtime.llm, inputs.calib_text, settings, runtime.gamma)
    write_with_metadata(model, output, fitted.metadata())
    return fitted


def provenance(inputs: Inputs, calibration: Calibration | None, imatrix: str, allocation: dict | None,
               upgrades: dict[str, str] | None, so8t: BakeStep | None,
               trained: dict | None = None) -> dict[str, object]:
    """Where θ came from: the input, reference, type, calibration, importance matrix, allocation, bake and
    training (`trained`: convert's `theta_train` summary, None when θ is the closed form's)."""
    opts = inputs.opts
    out: dict[str, object] = {
        nkat.SOURCE_SHA256: inputs.input_sha256,
        nkat.SOURCE_NAME: Path(opts.input).name,
        nkat.REFERENCE_SHA256: inputs.reference_sha256,
        nkat.OUTTYPE: inputs.outtype,
        nkat.CALIBRATION_METHOD: "activation" if (calibration and opts.theta_calib == "activation") else "none",
        nkat.IMATRIX: imatrix,
        nkat.TOOL_VERSION: __version__,
    }
    if calibration is not None:
        out[nkat.CALIBRATION_SHA256] = calibration.text_sha256
        out[nkat.CALIBRATION_TOKENS] = calibration.tokens
        out[nkat.CALIBRATION_SOURCE] = calibration.text_source
    return (out | _allocation_provenance(allocation, upgrades) | (so8t.metadata() if so8t else {})
            | (_train_provenance(trained) if trained else {}))


def _train_provenance(trained: dict) -> dict[str, object]:
    """The training's options and losses; the floats as FLOAT64, so the learning rate reads back as given."""
    return {nkat.TRAIN_MODE: trained["mode"], nkat.TRAIN_STEPS: trained["steps"],
            nkat.TRAIN_LR: Value(GGUFValueType.FLOAT64, float(trained["lr"])), nkat.TRAIN_TOKENS: trained["tokens"],
            nkat.TRAIN_SEED: trained["seed"], nkat.TRAIN_DEVICE: trained["device"],
            nkat.TRAIN_INITIAL_LOSS: Value(GGUFValueType.FLOAT64, float(trained["initial_loss"])),
            nkat.TRAIN_FINAL_LOSS: Value(GGUFValueType.FLOAT64, float(trained["final_loss"]))}


def _allocation_provenance(allocation: dict | None, upgrades: dict[str, str] | None) -> dict[str, object]:
    if allocation is None:
        return {nkat.ALLOCATION_METHOD: "uniform"}
    sensitivity = {k: round(v["sensitivity"], 9) for k, v in allocation["sensitivity"].items()}
    out: dict[str, object] = {nkat.ALLOCATION_METHOD: allocation["method"],
                              nkat.ALLOCATION_BUDGET: allocation["budget_bytes"],
                              nkat.ALLOCATION_SENSITIVITY: json.dumps(sensitivity, sort_keys=True)}
    if allocation["max_weights"] is not None:
        key = nkat.ALLOCATION_OP_BUDGET if allocation["method"] == "mix" else nkat.ALLOCATION_MAX_WEIGHTS
        out[key] = allocation["max_weights"]
    if allocation["method"] == "mix":
        out[nkat.ALLOCATION_TYPES] = nkat.types_listing(upgrades or {})
    return out
