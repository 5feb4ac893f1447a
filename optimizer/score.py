"""The TPE score the search maximises, and the definition written beside it into every output.

The seed divided ppl⁻¹ by log10(λθ), which is zero for the baseline (λθ = 0 when theta is off);
dividing by 1 + log10(1 + λθ) instead gives the baseline exactly ppl⁻¹, as the seed's baseline figure
does, and lowers the score smoothly as theta slows generation down.
"""

from __future__ import annotations

import math

SCORE_DEFINITION = {
    "formula": "TPE = ppl^-1 / (1 + log10(1 + lambda_theta)),  lambda_theta = max(0, tg_baseline / tg_theta - 1)",
    "ppl": "perplexity by llama-perplexity's method on the CALIBRATION split (never the evaluation split)",
    "tg_baseline": "generation tokens/s of the quantized model with theta off",
    "tg_theta": "generation tokens/s with theta at the trial's rank (measured once per rank, interleaved)",
    "theta_off": "theta off (rank 0): lambda_theta = 0, so TPE = 1 / ppl",
}


def slowdown(tg_baseline: float, tg_theta: float) -> float:
    """λθ: how much slower generation is with theta; a measurement that came out faster counts as 0."""
    if tg_baseline <= 0 or tg_theta <= 0:
        raise ValueError("generation speeds must be positive")
    return max(0.0, tg_baseline / tg_theta - 1.0)


def tpe_score(ppl: float, lam: float) -> float:
    """ppl⁻¹ / (1 + log10(1 + λθ)): higher is better."""
    if ppl <= 0 or lam < 0:
        raise ValueError("ppl must be positive and the slowdown non-negative")
    return 1.0 / ppl / (1.0 + math.log10(1.0 + lam))
