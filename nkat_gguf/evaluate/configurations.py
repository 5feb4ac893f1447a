"""The rows every QC run measures: theta at γ and theta off (or the plain model), then the reference.

One model load for all of the model's rows (γ is the adapter's scale), one for the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import llama_cpp

from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.format import nkat
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.texts import Text

# measure(llm, gamma) -> that row's figures; gamma None is theta off, the plain model or the reference
Measure = Callable[[llama_cpp.Llama, float | None], dict]


def default_reference_for(runtime: NkatRuntime) -> Path | None:
    """The embedded default model, when it is the reference this NKAT file was made against."""
    expected = (runtime.theta.provenance if runtime.theta else {}).get(nkat.REFERENCE_SHA256)
    try:
        candidate = default_model_path()
    except InputError:
        return None
    return candidate if expected and sha256_file(candidate) == expected else None


def report_head(model: Path, reference: Path | None, text: Text) -> dict:
    """The first keys of every measurement report: what was measured, against what, on which text."""
    return {"model": str(model), "reference": str(reference) if reference else None, "text": text.source,
            "text_sha256": text.sha256}


def measure_rows(model: Path, options: RuntimeOptions, measure: Measure, gamma: float | None = None,
                 reference: Path | None = None, with_reference: bool = True) -> tuple[dict[str, dict], Path | None]:
    """Rows "theta" (at `gamma`, default the file's) and "theta_off", or "model" for a file without theta,
    then "reference" (`reference`, or the default model when the file was made from it), and the reference used."""
    rows: dict[str, dict] = {}
    with NkatRuntime(model, options) as runtime:
        gammas = {"theta": runtime.resolve_gamma(gamma), "theta_off": None} \
            if runtime.has_theta else {"model": None}
        for name, g in gammas.items():
            runtime.set_gamma(g)
            rows[name] = measure(runtime.llm, g)
        reference = (reference or default_reference_for(runtime)) if with_reference else None
    if reference is not None:
        with NkatRuntime(reference, options) as ref:
            rows["reference"] = measure(ref.llm, None)
    return rows, reference
