"""The quality table: what the importance matrix and θ each buy, measured in one process.

Five rows — the reference, plain quantization, importance-matrix quantization, θ alone (plain + θ)
and importance matrix + θ — each a real file that `nkat-gguf convert` writes, with its perplexity on
the evaluation split, its size, its speed and the share of the reference gap it recovers. One
calibration feeds every variant (the importance matrix and θ's activation weighting), so the rows
differ only in what they switch on. The README's headline comes from this table, whatever it shows.
"""

from __future__ import annotations

import functools
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import llama_cpp

from nkat_gguf.convert import ConvertOptions, ConvertReport, convert
from nkat_gguf.convert.calib_text import calibration_text
from nkat_gguf.convert.calibrate import Calibration, calibrate
from nkat_gguf.convert.checks import reference_source
from nkat_gguf.convert.moment_groups import parse_memory
from nkat_gguf.engine.measure.bench import device_name
from nkat_gguf.engine.measure.kld import base_matches, kl_divergence, write_base
from nkat_gguf.engine.measure.speed import Configuration, interleaved_rates, paired_ratio
from nkat_gguf.engine.measure.perplexity import PerplexityResult, perplexity, tokenize_text
from nkat_gguf.engine.llama.probe import check_model
from nkat_gguf.engine.llama.quantize import resolve_outtype
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.evaluate.compare import CompareSettings
from nkat_gguf.format import nkat
from nkat_gguf.format.atomic import check_writable_dir
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.limits import DEFAULT_GAMMA, DEFAULT_OUTTYPE, DEFAULT_THETA_RANK
from nkat_gguf.texts import Text

# variant -> (--imatrix, carries θ); the reference row is the input (or --reference) itself
VARIANTS: dict[str, tuple[str, bool]] = {
    "plain": ("none", False),
    "imatrix": ("auto", False),
    "theta": ("none", True),
    "imatrix+theta": ("auto", True),
}


@dataclass(frozen=True)
class QualitySettings:
    outtype: str = DEFAULT_OUTTYPE
    theta_rank: int = DEFAULT_THETA_RANK
    gamma: float = DEFAULT_GAMMA
    n_ctx: int = 512
    n_chunks: int = 16
    repetitions: int = 3
    n_prompt: int = 512
    n_gen: int = 128
    progress: bool = True


def calibrate_once(model: Path, reference: Path | None, calib_text: Path | None, progress: bool) -> Calibration:
    """The one calibration pass every variant shares, on the weights θ aims at (as convert does it)."""
    if reference is not None:
        reference_source(TensorSource(model), reference)  # same checks as convert
    target = reference or model
    return calibrate(target, calibration_text(calib_text, target, progress=progress), progress=progress,
                     second_moments=ConvertOptions.theta_fit == "whiten",
                     memory=parse_memory(ConvertOptions.calib_memory))


def build_variants(model: Path, reference: Path | None, calibration: Calibration, workdir: Path,
                   settings: QualitySettings) -> dict[str, ConvertReport]:
    """Convert the model once per variant; only the variants that use the calibration are given it."""
    reports = {}
    for name, (imatrix, with_theta) in VARIANTS.items():
        opts = ConvertOptions(input=model, output=workdir / f"{model.stem}.{settings.outtype}.{name}.gguf",
                              outtype=settings.outtype, reference=reference,
                              theta_rank=settings.theta_rank if with_theta else 0, gamma=settings.gamma,
                              imatrix=imatrix, progress=settings.progress)
        uses_calibration = imatrix == "auto" or with_theta
        reports[name] = convert(opts, calibration if uses_calibration else None)
    return reports


def measure_files(files: dict[str, Path], texts: dict[str, Text], runtime_options: RuntimeOptions,
                  settings: CompareSettings, kld_bases: dict[str, Path] | None = None,
                  kld_base_model: str | None = None, theta_off: bool = False) -> dict[str, dict]:
    """Speed and perplexity of every file, θ on at the file's γ where it has θ, all loaded at once.

    Speed goes through the one interleaving primitive (engine/measure/speed.py): file by file each round,
    re-warmed after every switch of model, so drift on a shared machine hits every row alike. Then
    each file's perplexity on each text. With `kld_bases` (text key -> llama-perplexity base file) the
    file named `kld_base_model` is measured first and writes them (unless they already hold this text's
    tokens: a cache), and every other file's pass also gives its KL divergence from it (`kld` per text).
    With `theta_off`, every file with θ is also timed with θ off in each round, right beside θ on, and its
    row gets `speed_theta_vs_off`: the paired ratios with their 95 % intervals; rounds go on until each interval
    is within ±settings.ratio_halfwidth (or settings.max_repetitions).
    """
    with ExitStack() as stack:
        runtimes = {name: stack.enter_context(NkatRuntime(path, runtime_options)) for name, path in files.items()}
        gammas = {name: rt.resolve_gamma() for name, rt in runtimes.items()}  # None: no θ in the file
        configurations, pairs = {}, []
        for name, rt in runtimes.items():
            configurations[name] = Configuration(rt.llm, functools.partial(rt.set_gamma, gammas[name]))
            if theta_off and gammas[name] is not None:
                configurations[_off(name)] = Configuration(rt.llm, functools.partial(rt.set_gamma, None))
                pairs.append((name, _off(name)))
        speed = interleaved_rates(configurations, replace(settings, ratio_pairs=tuple(pairs)))
        tokenizer = next(iter(runtimes.values())).llm  # one model, one tokenizer
        tokens = {key: tokenize_text(tokenizer, text.content) for key, text in texts.items()}
        order = sorted(runtimes, key=lambda name: name != kld_base_model)  # the KLD base model first: it writes the bases
        rows = {}
        for name in order:
            rt = runtimes[name]
            rt.set_gamma(gammas[name])
            ppl, kld = {}, {}
            for key in texts:
                ppl[key], kld[key] = _measure_text(rt.llm, tokens[key], settings, name == kld_base_model,
                                                   kld_bases[key] if kld_bases else None)
            rows[name] = {"file": files[name].name, "file_bytes": files[name].stat().st_size,
                          "theta": gammas[name] is not None, "gamma": gammas[name],
                          "perplexity": {key: {"ppl": r.ppl, "ppl_stderr": r.ppl_stderr, "chunks": r.n_chunks}
                                         for key, r in ppl.items()},
                          **({"kld": kld} if kld_bases else {}),
                          **{k: v for k, v in speed[name].items() if k != "avg_latency_ms"}}
            if (name, _off(name)) in pairs:
                off = speed[_off(name)]
                rows[name]["theta_off_tokens_per_second"] = {"pp": off["pp_tokens_per_second"],
                                                             "tg": off["tg_tokens_per_second"]}
                rows[name]["speed_theta_vs_off"] = {part: paired_ratio(speed[name][f"{part}_runs"], off[f"{part}_runs"])
                                                    for part in ("pp", "tg")}
    return {name: rows[name] for name in files}


def _off(name: str) -> str:
    return f"{name} (theta off)"


def _measure_text(llm: llama_cpp.Llama, tokens: list[int], settings: CompareSettings, is_kld_base: bool,
                  base: Path | None) -> tuple[PerplexityResult, dict | None]:
    """One file's perplexity on one text and, against a base file, its KLD (None for the KLD base model itself)."""
    if base is None or (is_kld_base and base_matches(base, llm, tokens, settings.n_ctx, settings.n_chunks)):
        return perplexity(llm, tokens, settings.n_ctx, settings.n_chunks, settings.progress), None
    if is_kld_base:
        return write_base(llm, tokens, base, settings.n_ctx, settings.n_chunks, settings.progress), None
    result = kl_divergence(llm, base, settings.progress, tokens)
    return result.perplexity, result.kld.as_dict()


def measure(files: dict[str, Path], text: Text, runtime_options: RuntimeOptions,
            settings: QualitySettings) -> dict[str, dict]:
    """`measure_files` on the table's one text, its perplexity fields flat in each row."""
    rows = measure_files(files, {"text": text}, runtime_options,
                         CompareSettings(n_ctx=settings.n_ctx, n_chunks=settings.n_chunks,
                                         repetitions=settings.repetitions, n_prompt=settings.n_prompt,
                                         n_gen=settings.n_gen, progress=settings.progress))
    for row in rows.values():
        row.update(row.pop("perplexity")["text"])
    return rows


def quality_table(model: Path, text: Text, runtime_options: RuntimeOptions,
                  settings: QualitySettings = QualitySettings(), reference: Path | None = None,
                  calib_text: Path | None = None, out_dir: Path | None = None) -> dict:
    """Calibrate once, write the four variants (into `out_dir`, else a temporary directory), measure all five rows."""
    if out_dir is not None:
        check_writable_dir(Path(out_dir).resolve())  # before the long calibration, not after it
    for path in (model, reference) if reference is not None else (model,):
        check_model(path, settings.n_ctx)  # a bad --ctx or --reference fails now, not after the variants
    resolve_outtype(settings.outtype, read_layout(model))
    start = time.perf_counter()
    calibration = calibrate_once(model, reference, calib_text, settings.progress)
    calibrate_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="nkat-quality-") as tmp:
        reports = build_variants(model, reference, calibration, Path(out_dir or tmp), settings)
        files = {"reference": reference or model, **{name: Path(r.output) for name, r in reports.items()}}
        rows = measure(files, text, runtime_options, settings)
        imatrix = {name: read_layout(path).get(nkat.IMATRIX) for name, path in files.items()}
    gap = rows["plain"]["ppl"] - rows["reference"]["ppl"]
    for name, row in rows.items():
        row["gap_recovered"] = (rows["plain"]["ppl"] - row["ppl"]) / gap if gap > 0 else None
        row["tg_vs_plain"] = row["tg_tokens_per_second"] / rows["plain"]["tg_tokens_per_second"]
        row["imatrix"] = imatrix[name]  # the provenance each file carries; None for an unconverted reference
        row["convert_seconds"] = reports[name].seconds if name in reports else None
    return {
        "model": str(model), "reference": str(reference or model), "out_dir": str(out_dir) if out_dir else None,
        "outtype": settings.outtype,
        "theta_rank": settings.theta_rank, "gamma": settings.gamma,
        "text": text.source, "text_sha256": text.sha256, "n_ctx": settings.n_ctx,
        "repetitions": settings.repetitions, "n_prompt": settings.n_prompt, "n_gen": settings.n_gen,
        "device": device_name(),
        "calibration": {"source": calibration.text_source, "sha256": calibration.text_sha256,
                        "tokens": calibration.tokens, "seconds": round(calibrate_seconds, 3)},
        "variants": rows,
    }


def format_quality_table(result: dict) -> str:
    """The table as text: one row per variant, the gap share last because it is the point."""
    rows = result["variants"]
    mib = 1 << 20
    lines = [
        f"model {result['model']} -> {result['outtype']}, theta rank {result['theta_rank']} "
        f"(gamma {result['gamma']:g}); reference {result['reference']}",
        f"text {result['text']} ({rows['plain']['chunks']} chunks of {result['n_ctx']}); calibration "
        f"{result['calibration']['source']} ({result['calibration']['tokens']} tokens); "
        f"{result['repetitions']} interleaved speed rounds on {result['device']}",
        f"{'':15}{'MiB':>8}{'perplexity':>20}{'pp' + str(result['n_prompt']) + ' tok/s':>18}"
        f"{'tg' + str(result['n_gen']) + ' tok/s':>18}{'tg vs plain':>13}{'gap recovered':>15}",
    ]
    for name, r in rows.items():
        share = "n/a" if r["gap_recovered"] is None else f"{100 * r['gap_recovered']:.1f} %"
        lines.append(f"{name:15}{r['file_bytes'] / mib:>8.2f}{r['ppl']:>11.4f} ± {r['ppl_stderr']:<6.4f}"
                     f"{r['pp_tokens_per_second']:>10.1f} ± {r['pp_sd']:<5.1f}"
                     f"{r['tg_tokens_per_second']:>10.1f} ± {r['tg_sd']:<5.1f}{r['tg_vs_plain']:>11.3f}"
                     f"{share:>15}")
    if rows["reference"]["gap_recovered"] is None:
        lines.append("plain quantization is not worse than the reference here: no gap to recover")
    return "\n".join(lines)
