"""How much perplexity a unit of captured residual energy buys, per weight kind, measured on calibration text.

theta at a fixed rank on one kind of weight only (all attn_q, or all ffn_down, ...) is applied in llama.cpp
to the quantized model, and the drop in mean NLL on calibration text is divided by the residual energy
that theta captures there. The text is the end of the calibration split (its last SENSITIVITY_CHUNKS windows),
never an evaluation text. With the default calibration (32 windows of 512, nearly all of the built-in
split) those windows are among the ones whose statistics fitted theta: the sensitivity only ranks the
kinds against each other, and the evaluation texts stay unseen. A kind whose theta does not lower the
NLL gets sensitivity 0: the allocation gives it no rank, and prices its types' error at the least positive
sensitivity of the other kinds (math/allocation.type_gains), not at 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nkat_gguf.engine.measure.perplexity import perplexity
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.engine.llama.vocab import tokenize
from nkat_gguf.errors import InputError
from nkat_gguf.format.nkat import NkatTheta
from nkat_gguf.math.allocation import weight_kind
from nkat_gguf.math.theta import LowRank, ThetaInt8, quantize_int8
from nkat_gguf.texts import Text

SENSITIVITY_RANK = 8  # theta per kind is measured at this rank (lower where a weight is smaller)
SENSITIVITY_CTX = 512
SENSITIVITY_CHUNKS = 4


def held_out_tokens(model_path: Path, text: Text) -> list[int]:
    """The last SENSITIVITY_CHUNKS windows of the calibration text (fewer if the text is shorter)."""
    tokens = tokenize(model_path, text.content)
    if len(tokens) < SENSITIVITY_CTX:
        raise InputError(f"the calibration text needs {SENSITIVITY_CTX} tokens to measure per-kind sensitivity for "
                         f"--theta-budget; it has {len(tokens)}")
    n = min(SENSITIVITY_CHUNKS, len(tokens) // SENSITIVITY_CTX) * SENSITIVITY_CTX
    return tokens[len(tokens) - n:]


def kind_sensitivity(quantized: Path, fits: Mapping[str, LowRank], energy: dict[str, np.ndarray], text: Text,
                     gamma: float, work_dir: Path, threads: int | None = None,
                     progress: bool = True) -> dict[str, dict[str, float]]:
    """Per kind: NLL drop with theta on that kind only, the energy it captures, and their ratio (sensitivity)."""
    tokens = held_out_tokens(quantized, text)
    thetas = {n: quantize_int8(f.truncate(min(SENSITIVITY_RANK, f.rank))) for n, f in fits.items()}
    options = RuntimeOptions(n_ctx=SENSITIVITY_CTX, n_batch=SENSITIVITY_CTX, n_threads=threads or None)
    with NkatRuntime(quantized, options, cache_dir=work_dir) as runtime:
        return sensitivity_on(runtime, thetas, energy, tokens, gamma, progress)


def sensitivity_on(runtime: NkatRuntime, thetas: dict[str, ThetaInt8], energy: dict[str, np.ndarray],
                   tokens: list[int], gamma: float, progress: bool = True) -> dict[str, dict[str, float]]:
    """kind_sensitivity on a loaded model: theta of one kind at a time (each weight at its rank in `thetas`)."""
    def nll() -> float:
        return math.log(perplexity(runtime.llm, tokens, SENSITIVITY_CTX, SENSITIVITY_CHUNKS, progress=False).ppl)

    runtime.set_gamma(None)
    off = nll()
    result: dict[str, dict[str, float]] = {}
    kinds = sorted({weight_kind(n) for n in thetas})
    for kind in tqdm(kinds, desc="sensitivity per weight kind", unit="kind", disable=not progress, leave=False):
        chosen = {n: t for n, t in thetas.items() if weight_kind(n) == kind}
        runtime.use_theta(NkatTheta(gamma, chosen), gamma)
        drop = off - nll()
        captured = float(sum(energy[n][:t.rank].sum() for n, t in chosen.items()))
        result[kind] = {"nll_drop": drop, "energy": captured,
                        "sensitivity": max(drop, 0.0) / captured if captured > 0 else 0.0}
    runtime.set_gamma(None)
    return result
