"""`nkat-gguf qc confidence`: ECE, Brier, NLL, top-1 and a fitted temperature, on the perplexity pass's logits.

Per configuration (theta at its γ, theta off, the reference) the model is loaded once and read twice:
the calibration split (`calib_chunks` chunks, logits kept) fits T, then the evaluation split is scored
at T = 1 and at the fitted T in the same pass. Both passes are `engine.perplexity.perplexity` with a
per-chunk hook, so the scored positions are exactly llama-perplexity's and perplexity comes for free.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.engine.measure.temperature import CalibrationSettings, fit_llm_temperature, long_enough
from nkat_gguf.errors import InputError
from nkat_gguf.evaluate.configurations import measure_rows, report_head
from nkat_gguf.format.gguf_file import write_with_metadata
from nkat_gguf.format.nkat import LEGACY_TEMPERATURE_PREFIX, CalibratedTemperature, read_temperature
from nkat_gguf.math.confidence import ECE_BINS, TEMPERATURE_RANGE, CalibrationAccumulator
from nkat_gguf.texts import Text


def measure_llm(llm: llama_cpp.Llama, eval_tokens: list[int], calib_text: Text, settings: CalibrationSettings,
                gamma: float | None) -> dict:
    """The fitted temperature, and every metric on the evaluation tokens before and after applying it."""
    fitted = fit_llm_temperature(llm, calib_text, settings, gamma)
    before, after = CalibrationAccumulator(1.0), CalibrationAccumulator(fitted.temperature)

    def score(z: np.ndarray, y: np.ndarray) -> None:
        before.add(z, y)
        after.add(z, y)

    ppl = perplexity(llm, eval_tokens, settings.n_ctx, settings.n_chunks, settings.progress, on_chunk=score)
    low, high = TEMPERATURE_RANGE
    at_bound = min(fitted.temperature - low, high - fitted.temperature) < 1e-3
    return {"gamma": gamma, "temperature": fitted.temperature, "temperature_at_bound": at_bound,
            "temperature_tokens": fitted.tokens,
            "before": before.result().as_dict(), "after": after.result().as_dict(), "perplexity": ppl.as_dict()}


def calibration_report(model: Path, text: Text, calib_text: Text, runtime_options: RuntimeOptions,
                       settings: CalibrationSettings, gamma: float | None = None,
                       reference: Path | None = None, with_reference: bool = True) -> dict:
    """Calibration of the model (theta at γ and off, or the plain model) and of its reference."""
    stored = read_temperature(model)
    tokens: dict[str, list[int]] = {}  # per model file: the model's rows share one tokenization

    def measure(llm: llama_cpp.Llama, gamma: float | None) -> dict:
        if llm.model_path not in tokens:
            tokens[llm.model_path] = long_enough(tokenize_text(llm, text.content), text, settings.n_ctx)
        return measure_llm(llm, tokens[llm.model_path], calib_text, settings, gamma)

    configurations, reference = measure_rows(model, runtime_options, measure, gamma, reference, with_reference)
    main = next(iter(configurations))
    return {
        **report_head(model, reference, text),
        "calibration_text": calib_text.source,
        "calibration_text_sha256": calib_text.sha256,
        "n_ctx": settings.n_ctx,
        "chunks": configurations[main]["perplexity"]["n_chunks"],
        "calibration_chunks": settings.calib_chunks,
        "ece_bins": ECE_BINS,
        "ece_binning": "equal-width",
        "temperature_range": list(TEMPERATURE_RANGE),
        "stored_temperature": None if stored is None else stored.temperature,
        "main": main,
        "configurations": configurations,
    }


def fitted_temperature(report: dict) -> CalibratedTemperature:
    """The temperature of the report's main configuration (theta at γ, or the plain model)."""
    main = report["configurations"][report["main"]]
    return CalibratedTemperature(main["temperature"], report["calibration_text_sha256"], main["temperature_tokens"],
                                 main["gamma"])


def write_temperature(model: Path, output: Path, temperature: CalibratedTemperature) -> None:
    """`output` = `model` with the temperature keys set, written atomically; the input is never touched."""
    if output.exists() and output.resolve() == Path(model).resolve():
        raise InputError(f"--write-temperature {output} is the input model; choose another file")
    if output.is_dir():
        raise InputError(f"--write-temperature {output} is a directory; give a file name")
    write_with_metadata(model, output, temperature.metadata(), drop_prefixes=(LEGACY_TEMPERATURE_PREFIX,))
