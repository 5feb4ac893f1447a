"""`nkat-gguf compare`: theta off vs theta on in one process, plus the reference, all measured.

With a reference, theta off and on are also measured by their KL divergence from it, as
llama-perplexity --kl-divergence computes it (the reference's pass writes a temporary base file).

Speed repetitions are interleaved (off, on, off, on, ...; engine/measure/speed.py) so machine noise hits both
alike; the ratios are what carries over to another machine, not the absolute tokens per second.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from nkat_gguf.engine.measure.bench import device_name
from nkat_gguf.engine.measure.kld import kl_divergence, write_base
from nkat_gguf.engine.measure.speed import SpeedSettings, interleaved_speed, paired_ratio
from nkat_gguf.engine.measure.perplexity import PerplexityResult, perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.evaluate.configurations import default_reference_for, report_head
from nkat_gguf.format import nkat
from nkat_gguf.texts import Text


@dataclass(frozen=True)
class CompareSettings(SpeedSettings):
    """Speed settings plus the perplexity chunks."""

    n_ctx: int = 512
    n_chunks: int | None = 16


def compare(model: Path, text: Text, runtime_options: RuntimeOptions, settings: CompareSettings,
            gamma: float | None = None, reference: Path | None = None) -> dict:
    """Measure one NKAT model with theta off and on, and its reference; every figure is measured here."""
    with NkatRuntime(model, runtime_options) as runtime:
        if not runtime.has_theta:
            raise InputError(f"{model.name} carries no theta: nothing to compare (convert it with --theta-rank > 0)")
        gamma = runtime.resolve_gamma(gamma)
        reference = reference or default_reference_for(runtime)
        tokens = tokenize_text(runtime.llm, text.content)
        speed = interleaved_speed(runtime, {"theta_off": None, "theta": gamma},
                                  replace(settings, ratio_pairs=(("theta", "theta_off"),)))
        if reference is None:
            ppl, kld = _theta_passes(runtime, tokens, settings, gamma)
        provenance = dict(runtime.theta.provenance)
        rank = runtime.theta.rank
    if reference is not None:  # the reference's pass first: its log-probabilities are what KLD compares with
        with tempfile.TemporaryDirectory(prefix="nkat-compare-") as tmp:
            base = Path(tmp) / "reference.kld"
            with NkatRuntime(reference, runtime_options) as ref_runtime:
                ref_ppl = write_base(ref_runtime.llm, tokenize_text(ref_runtime.llm, text.content), base,
                                     settings.n_ctx, settings.n_chunks, settings.progress)
            with NkatRuntime(model, runtime_options) as runtime:
                ppl, kld = _theta_passes(runtime, tokens, settings, gamma, base)
        ppl["reference"] = ref_ppl
    base, theta = speed["theta_off"], speed["theta"]
    result = {
        **report_head(model, reference, text),
        "device": device_name(),
        "theta_enabled": True,
        "theta_rank": rank,
        "gamma": gamma,
        "outtype": provenance.get(nkat.OUTTYPE),
        "imatrix": provenance.get(nkat.IMATRIX),
        "n_ctx": settings.n_ctx,
        "chunks": ppl["theta_off"].n_chunks,
        "repetitions": settings.repetitions,
        "speed": speed,
        "speed_ratio": {"pp": theta["pp_tokens_per_second"] / base["pp_tokens_per_second"],
                        "tg": theta["tg_tokens_per_second"] / base["tg_tokens_per_second"]},
        # per-round paired ratios, rounds added until each 95 % interval is within ±settings.ratio_halfwidth
        "speed_ratio_interval": {part: paired_ratio(theta[f"{part}_runs"], base[f"{part}_runs"]) for part in ("pp", "tg")},
        "overhead_percentage": {
            "pp": 100.0 * (base["pp_tokens_per_second"] / theta["pp_tokens_per_second"] - 1.0),
            "tg": 100.0 * (base["tg_tokens_per_second"] / theta["tg_tokens_per_second"] - 1.0)},
        "perplexity": {name: r.as_dict() for name, r in ppl.items()},
        "kld": kld,  # theta off and on against the reference, as llama-perplexity --kl-divergence; {} without one
        "gap_recovered": None,
    }
    if "reference" in ppl:
        gap = ppl["theta_off"].ppl - ppl["reference"].ppl
        result["gap_recovered"] = (ppl["theta_off"].ppl - ppl["theta"].ppl) / gap if gap > 0 else None
    return result


def _theta_passes(runtime: NkatRuntime, tokens: list[int], settings: CompareSettings, gamma: float,
                  base: Path | None = None) -> tuple[dict[str, PerplexityResult], dict[str, dict]]:
    """Perplexity with theta off and on; against a reference's base file, each pass's KLD too."""
    ppl, kld = {}, {}
    for name, g in (("theta_off", None), ("theta", gamma)):
        runtime.set_gamma(g)
        if base is None:
            ppl[name] = perplexity(runtime.llm, tokens, settings.n_ctx, settings.n_chunks, settings.progress)
        else:
            result = kl_divergence(runtime.llm, base, settings.progress, tokens)
            ppl[name], kld[name] = result.perplexity, result.kld.as_dict()
    return ppl, kld


def format_compare(result: dict) -> str:
    """A short human-readable table of a compare result."""
    s, p = result["speed"], result["perplexity"]
    lines = [
        f"model      {result['model']}  (theta rank {result['theta_rank']}, gamma {result['gamma']:g}, "
        f"outtype {result['outtype']}, imatrix {result['imatrix']})",
        f"text       {result['text']}  ({result['chunks']} chunks of {result['n_ctx']})",
        f"{'':12}{'pp tok/s':>18}{'tg tok/s':>18}{'perplexity':>20}",
    ]
    for name in ("theta_off", "theta"):
        lines.append(f"{name:12}{s[name]['pp_tokens_per_second']:>10.1f} ± {s[name]['pp_sd']:<5.1f}"
                     f"{s[name]['tg_tokens_per_second']:>10.1f} ± {s[name]['tg_sd']:<5.1f}"
                     f"{p[name]['ppl']:>12.4f} ± {p[name]['ppl_stderr']:.4f}")
    if "reference" in p:
        lines.append(f"{'reference':12}{'':36}{p['reference']['ppl']:>12.4f} ± {p['reference']['ppl_stderr']:.4f}")
    o = result["overhead_percentage"]
    ci = result["speed_ratio_interval"]
    lines.append(f"theta overhead: pp {o['pp']:+.1f} %, tg {o['tg']:+.1f} %   (paired speed ratio, 95 % interval, "
                 + ", ".join(f"{p} {ci[p]['ratio']:.3f} [{ci[p]['ci95'][0]:.3f}, {ci[p]['ci95'][1]:.3f}]"
                             for p in ("pp", "tg")) + f"; {ci['tg']['rounds']} rounds)")
    for name, k in result.get("kld", {}).items():
        lines.append(f"KLD {name:10}{k['kld']:.6f} [95 % CI {k['kld_ci95'][0]:.6f}, {k['kld_ci95'][1]:.6f}]  "
                     f"median {k['kld_median']:.6f}  99 % {k['kld_percentiles']['99.0']:.6f}  "
                     f"max {k['kld_max']:.6f}  same top {100 * k['same_top']:.2f} %")
    if result["gap_recovered"] is not None:
        lines.append(f"share of the reference gap recovered by theta: {100 * result['gap_recovered']:.1f} %")
    else:
        lines.append("no reference measured (pass --reference REF.gguf): gap recovered not computed")
    return "\n".join(lines)
