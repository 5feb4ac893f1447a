"""`nkat-gguf` command line: thin shells that parse options, call the library, print text or JSON.

Library errors (NkatError) become one line on stderr and exit code 1; nothing here does math or
file formats.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import click

from nkat_gguf import __version__
from nkat_gguf.errors import NkatError

MODEL_HELP = "GGUF file, or 'default' for the embedded SmolLM2-135M-Instruct Q4_1."


def _fail_cleanly(fn: Callable) -> Callable:
    """Turn library errors into one line and exit code 1 (click prints 'Error: ...')."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NkatError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None

    return wrapper


def _emit(result: dict, as_json: bool, text: Callable[[dict], str]) -> None:
    click.echo(json.dumps(result, indent=2, default=str) if as_json else text(result))


def _gamma(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        gamma = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number") from None
    if math.isnan(gamma) or math.isinf(gamma) or gamma < 0:
        raise click.BadParameter(f"{value} must be a finite number >= 0")
    return gamma


def engine_options(fn: Callable) -> Callable:
    """Options every engine command takes: GPU offload (ignored by a CPU build), threads, context."""
    options = [
        click.option("--gpu-layers", type=int, default=-1, show_default=True,
                     help="Layers to offload to a GPU (-1: all). A CPU build of llama.cpp ignores it."),
        click.option("--no-cuda", is_flag=True, help="Offload nothing to a GPU (same as --gpu-layers 0)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _runtime_options(gpu_layers: int, no_cuda: bool, threads: int | None, n_ctx: int = 512, **extra: Any):
    from nkat_gguf.engine.runtime import RuntimeOptions

    return RuntimeOptions(n_ctx=n_ctx, n_batch=max(n_ctx, 512), n_threads=threads,
                          n_gpu_layers=0 if no_cuda else gpu_layers, **extra)


class OneLineErrors(click.Group):
    """Every error, usage errors included, is one line on stderr: 'Error: ... (see nkat-gguf CMD --help)'."""

    def main(self, args: list[str] | None = None, **kwargs: Any) -> Any:
        try:
            result = super().main(args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "nkat-gguf"
            click.echo(f"Error: {exc.format_message()} (see {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nkat-gguf")
def main() -> None:
    """Convert GGUF models to NKAT GGUF (a low-rank quantization correction, theta, stored in metadata)
    and run, measure and tune them with llama.cpp.

    \b
    Typical use:
      nkat-gguf convert --input model.gguf --outtype Q4_0 --output model.nkat.gguf
      nkat-gguf compare --model model.nkat.gguf
    """


@main.command()
@click.option("--input", "input_", default="default", show_default=True, help=MODEL_HELP)
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the NKAT GGUF (written atomically; the input is never modified).")
@click.option("--outtype", default=None,
              help="llama.cpp quantization type (Q4_0, IQ4_NL, Q4_K_M, Q8_0, F16, ...) or 'same' as the input "
                   "(default: the type the frontier run chose, see 'Defaults' below).")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Higher-precision GGUF of the same model whose weights theta aims at (default: the input).")
@click.option("--theta-rank", type=int, default=None,
              help="Rank r of the correction per weight; 0 writes no theta (default: see 'Defaults' below).")
@click.option("--theta-gamma", callback=_gamma, default="0.97", show_default=True,
              help="Default gamma stored in the file (1 applies the full correction).")
@click.option("--selective-layers", multiple=True, metavar="NAME",
              help="Only these weights: GGUF names, globs (blk.*.ffn_*; blk.* for all) or Meta/HF names. "
                   "Repeatable (default: see 'Defaults' below).")
@click.option("--calib-text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 calibration text (default: the calibration split of Python's pydoc topics).")
@click.option("--theta-calib", type=click.Choice(["activation", "none"]), default="activation", show_default=True,
              help="activation: SVD weighted by sqrt(E[x^2]) of each weight's inputs; none: plain SVD.")
@click.option("--imatrix", default="auto", show_default=True,
              help="Importance matrix for quantization: auto (from the calibration), none, or a llama.cpp "
                   "imatrix file (GGUF or legacy .dat).")
@click.option("--threads", type=int, default=0, help="Quantization threads (0: all cores).")
@click.option("--so8t", default="none", show_default=True, metavar="none|hadamard|random|file:PATH",
              help="Bake SO(8) rotations into the weights before quantizing: hadamard/random rotate the residual "
                   "stream (the function is kept), file:PATH.safetensors folds trained gates (docs/SO8T.md). "
                   "QC compares before and after; if it fails nothing is written.")
@click.option("--so8t-seed", type=click.IntRange(min=0), default=None,
              help="Seed of the random rotation, or of random signs on the Hadamard blocks.")
@click.option("--so8t-heads", is_flag=True, help="Also rotate each layer's value/output pair per head (R2).")
@click.option("--force", is_flag=True, help="Write even if SO8T QC fails (the file records it).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the SO8T QC report (so8t-qc.json and so8t-qc.md) into this directory.")
@click.option("--optimize-rank", is_flag=True,
              help="Search rank and gamma with a quick Optuna study (nkat-gguf optimize --mode quick; study files in "
                   "OUTPUT.optimize/) and write the best model to --output; --theta-rank/--theta-gamma are ignored.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@_fail_cleanly
def convert(input_: str, output: Path, outtype: str | None, reference: Path | None, theta_rank: int | None,
            theta_gamma: float,
            selective_layers: tuple[str, ...], calib_text: Path | None, theta_calib: str, imatrix: str,
            threads: int, so8t: str, so8t_seed: int | None, so8t_heads: bool, force: bool, report_dir: Path | None,
            optimize_rank: bool, as_json: bool) -> None:
    """Quantize a GGUF with llama.cpp and store theta (what quantization lost, low rank) in its metadata.

    \b
    Defaults: the base type and theta that 'nkat-gguf frontier' measured best on the default model
    within +3 % of the base type's size, on both evaluation texts (BENCHMARKS.md, "Frontier (issue 9)"):
      --outtype IQ4_NL --theta-rank 8, theta on every attention/FFN weight
    """
    from nkat_gguf.convert import ConvertOptions
    from nkat_gguf.convert import convert as run_convert
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.so8t.bake_step import So8tOptions

    given = {"outtype": outtype, "theta_rank": theta_rank, "selective_layers": list(selective_layers) or None}
    options = ConvertOptions(
        input=resolve_model(input_), output=output, reference=reference, theta_gamma=theta_gamma,
        calib_text=calib_text, theta_calib=theta_calib, imatrix=imatrix, threads=threads,
        so8t=So8tOptions(mode=so8t, seed=so8t_seed, heads=so8t_heads, force=force, report_dir=report_dir),
        progress=sys.stderr.isatty() or not as_json, **{k: v for k, v in given.items() if v is not None})
    if optimize_rank:
        from nkat_gguf.optimizer.outputs import format_summary
        from nkat_gguf.optimizer.study import optimize_convert

        _emit(optimize_convert(options), as_json, format_summary)
        return
    _emit(run_convert(options).as_dict(), as_json, _format_convert)


def _format_convert(r: dict) -> str:
    mib = 1 << 20
    energy = [t["captured_energy"] for t in r["tensors"].values()]
    mean_energy = f"{100 * sum(energy) / len(energy):.1f} %" if energy else "n/a"
    lines = [f"wrote {r['output']} ({r['output_bytes'] / mib:.2f} MiB, {r['outtype']}, theta rank {r['theta_rank']} "
             f"on {len(r['tensors'])} weights, {r['theta_metadata_bytes'] / mib:.2f} MiB of theta metadata)",
             f"calibration: {r['calibration']}, importance matrix: {r['imatrix']}, "
             f"mean residual energy captured: {mean_energy}",
             "time: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items())]
    if r.get("so8t"):
        lines.append(f"SO8T {r['so8t']['description']}: {_format_qc(r['so8t']['qc'])}"
                     + (", written anyway (--force)" if r["so8t"]["forced"] else ""))
    return "\n".join(lines + [f"note: {n}" for n in r["notes"]])


def _format_qc(qc: dict) -> str:
    verdict = "QC passed" if qc["passed"] else f"QC FAILED ({'; '.join(qc['failures'])})"
    blocks = ("" if qc["max_orthogonality_error"] is None else
              f", max ‖RᵀR − I‖_F {qc['max_orthogonality_error']:.2g}, min det {qc['min_det']:.6g}")
    return (f"{verdict}: max |Δz| {qc['max_abs_dz']:.3g}, mean KL {qc['mean_kl']:.3g}, max KL {qc['max_kl']:.3g}, "
            f"top-1 agreement {qc['top1_agreement']:.4f} over {qc['tokens']} tokens{blocks}")


@main.group()
def qc() -> None:
    """Quality checks: `qc bake` compares a model before and after SO8T baking."""


@qc.command("bake")
@click.option("--pre", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="GGUF before baking (F32 weights for a meaningful comparison).")
@click.option("--post", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="GGUF after baking.")
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text; its first 128 tokens are compared (default: the evaluation split of pydoc topics).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
def qc_bake(pre: Path, post: Path, text: Path | None, as_json: bool) -> None:
    """Logits of two GGUFs in llama.cpp (F32 KV cache): max |Δz|, KL, top-1; exit 1 if a QC gate is missed."""
    from nkat_gguf.so8t.qc import QCFailed, compare_ggufs, qc_text

    result = compare_ggufs(pre, post, qc_text(text))
    _emit({"pre": str(pre), "post": str(post), **result.as_dict()}, as_json, _format_qc)
    if not result.passed:
        raise QCFailed(f"SO8T QC failed: {result.summary()}")


@main.command()
@click.option("--model", "-m", default="default", show_default=True, help=MODEL_HELP)
@click.option("--gamma", callback=_gamma, default=None, help="theta scale (default: the file's).")
@click.option("--no-theta", is_flag=True, help="Measure the plain quantized model (adapter removed).")
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text (default: the evaluation split of Python's pydoc topics).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk, as llama-perplexity -c.")
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Chunks to score (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@engine_options
@_fail_cleanly
def perplexity(model: str, gamma: float | None, no_theta: bool, text: Path | None, ctx: int, chunks: int | None,
               as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """Perplexity exactly as llama.cpp's llama-perplexity computes it."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.perplexity import perplexity as run_perplexity
    from nkat_gguf.engine.perplexity import tokenize_text
    from nkat_gguf.engine.runtime import NkatRuntime
    from nkat_gguf.texts import load_text

    path = resolve_model(model)
    content = load_text(text, "evaluation")
    with NkatRuntime(path, _runtime_options(gpu_layers, no_cuda, threads, n_ctx=ctx)) as rt:
        rt.set_gamma(None if no_theta else (gamma if gamma is not None else rt.default_gamma))
        result = run_perplexity(rt.llm, tokenize_text(rt.llm, content.content), ctx, chunks, progress=True)
        out = {"model": str(path), "theta_enabled": rt.gamma is not None, "gamma": rt.gamma,
               "text": content.source, **result.as_dict()}
    _emit(out, as_json, lambda r: f"perplexity {r['ppl']:.4f} ± {r['ppl_stderr']:.4f} over {r['n_chunks']} chunks "
                                  f"of {r['n_ctx']} ({r['tokens_per_second']:.1f} tok/s, theta "
                                  f"{'on, gamma ' + format(r['gamma'], 'g') if r['theta_enabled'] else 'off'})")


@main.command()
@click.option("--model", "-m", default="default", show_default=True, help=MODEL_HELP)
@click.option("--gamma", callback=_gamma, default=None, help="theta scale (default: the file's).")
@click.option("--n-prompt", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--n-gen", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--repetitions", "-r", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@engine_options
@_fail_cleanly
def bench(model: str, gamma: float | None, n_prompt: int, n_gen: int, repetitions: int, as_json: bool,
          gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """Prompt (pp) and generation (tg) speed as llama-bench measures it, theta off and on, interleaved."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.bench import device_name
    from nkat_gguf.engine.measure import SpeedSettings, interleaved_speed
    from nkat_gguf.engine.runtime import NkatRuntime

    path = resolve_model(model)
    settings = SpeedSettings(repetitions=repetitions, n_prompt=n_prompt, n_gen=n_gen)
    with NkatRuntime(path, _runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(512, n_prompt + n_gen))) as rt:
        gammas = {"baseline": None}
        if rt.has_theta:
            gammas["theta"] = gamma if gamma is not None else rt.default_gamma
        speed = interleaved_speed(rt, gammas, settings)
    main_config = speed.get("theta", speed["baseline"])
    out = {"model": str(path), "tokens_per_second": main_config["tg_tokens_per_second"],
           "prompt_tokens_per_second": main_config["pp_tokens_per_second"],
           "avg_latency_ms": main_config["avg_latency_ms"], "device": device_name(),
           "theta_enabled": "theta" in speed, "gamma": gammas.get("theta"),
           "overhead_percentage": (100.0 * (speed["baseline"]["tg_tokens_per_second"]
                                            / speed["theta"]["tg_tokens_per_second"] - 1.0)) if "theta" in speed else 0.0,
           "repetitions": repetitions, "n_prompt": n_prompt, "n_gen": n_gen, "runs": speed}
    _emit(out, as_json, _format_bench)


def _format_bench(r: dict) -> str:
    lines = [f"{name:9} pp{r['n_prompt']} {s['pp_tokens_per_second']:8.1f} ± {s['pp_sd']:.1f} tok/s   "
             f"tg{r['n_gen']} {s['tg_tokens_per_second']:8.1f} ± {s['tg_sd']:.1f} tok/s   "
             f"{s['avg_latency_ms']:.2f} ms/token" for name, s in r["runs"].items()]
    if r["theta_enabled"]:
        lines.append(f"theta generation overhead: {r['overhead_percentage']:+.1f} % (gamma {r['gamma']:g}, {r['device']})")
    return "\n".join(lines)


@main.command()
@click.option("--model", "-m", required=True, help="NKAT GGUF written by 'nkat-gguf convert'.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Reference GGUF for the gap (default: the embedded model when it is the file's reference).")
@click.option("--gamma", callback=_gamma, default=None, help="theta scale (default: the file's).")
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text (default: the evaluation split of Python's pydoc topics).")
@click.option("--ctx", type=int, default=512, show_default=True)
@click.option("--chunks", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--repetitions", "-r", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved speed repetitions per configuration.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@engine_options
@_fail_cleanly
def compare(model: str, reference: Path | None, gamma: float | None, text: Path | None, ctx: int, chunks: int,
            repetitions: int, as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """theta off vs on in one run: tok/s, overhead, perplexity, and the share of the reference gap recovered."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.compare import CompareSettings, format_compare
    from nkat_gguf.engine.compare import compare as run_compare
    from nkat_gguf.texts import load_text

    settings = CompareSettings(n_ctx=ctx, n_chunks=chunks, repetitions=repetitions)
    result = run_compare(resolve_model(model), load_text(text, "evaluation"),
                         _runtime_options(gpu_layers, no_cuda, threads, n_ctx=ctx), settings, gamma,
                         Path(reference) if reference else None)
    result["command"] = "nkat-gguf " + " ".join(sys.argv[1:])
    _emit(result, as_json, format_compare)


@main.command()
@click.option("--input", "input_", default="default", show_default=True, help=MODEL_HELP)
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Higher-precision GGUF theta aims at and the gap is measured to (default: the input).")
@click.option("--outtype", default="Q4_0", show_default=True, help="llama.cpp quantization type of every variant.")
@click.option("--theta-rank", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rank of theta in the two theta rows.")
@click.option("--calib-text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 calibration text (default: the calibration split of Python's pydoc topics).")
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 evaluation text (default: the evaluation split of Python's pydoc topics).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per perplexity chunk.")
@click.option("--chunks", type=click.IntRange(min=1), default=16, show_default=True,
              help="Evaluation chunks scored per row.")
@click.option("--repetitions", "-r", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved speed rounds over all five rows.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the four variant files here (default: a temporary directory, deleted afterwards).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@engine_options
@_fail_cleanly
def quality(input_: str, reference: Path | None, outtype: str, theta_rank: int, calib_text: Path | None,
            text: Path | None, ctx: int, chunks: int, repetitions: int, out_dir: Path | None, as_json: bool,
            gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """Reference, plain quantization, importance matrix, theta alone, importance matrix + theta: one run, one table."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.evaluate.quality import QualitySettings, format_quality_table, quality_table
    from nkat_gguf.texts import load_text

    settings = QualitySettings(outtype=outtype, theta_rank=theta_rank, n_ctx=ctx, n_chunks=chunks,
                               repetitions=repetitions)
    result = quality_table(resolve_model(input_), load_text(text, "evaluation"),
                           _runtime_options(gpu_layers, no_cuda, threads,
                                            n_ctx=max(ctx, settings.n_prompt, settings.n_gen)),
                           settings, reference, calib_text, out_dir)
    result["command"] = "nkat-gguf " + " ".join(sys.argv[1:])
    _emit(result, as_json, format_quality_table)



def _names(values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated options and comma-separated lists both work: --types Q4_0,IQ4_NL --types Q5_0."""
    return tuple(v.strip().upper() for value in values for v in value.split(",") if v.strip())


@main.command()
@click.option("--input", "input_", default="default", show_default=True, help=MODEL_HELP)
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Higher-precision GGUF theta aims at and the gap is measured to (default: the input).")
@click.option("--types", multiple=True, metavar="TYPE[,TYPE...]",
              help="llama.cpp types to quantize with the importance matrix (default: Q2_K ... Q5_0, see below).")
@click.option("--theta", "thetas", multiple=True, metavar="BASE:RANK[:WEIGHTS][:key=value]",
              help="An NKAT variant: theta of RANK on the importance-matrix BASE type, on WEIGHTS (all, ffn, attn "
                   "or --selective-layers patterns joined by ','); key=value sets another convert option. "
                   "Repeatable; 'none' for no NKAT variant.")
@click.option("--calib-text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 calibration text (default: the calibration split of Python's pydoc topics).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per perplexity chunk.")
@click.option("--chunks", type=int, default=8, show_default=True, help="Chunks scored per file and text.")
@click.option("--repetitions", "-r", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved speed rounds over all files.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep every file written here (created if missing; default: a temporary directory).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG of perplexity against file size, one panel per text.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one row per file, with its size and sha256.")
@engine_options
@_fail_cleanly
def frontier(input_: str, reference: Path | None, types: tuple[str, ...], thetas: tuple[str, ...],
             calib_text: Path | None, ctx: int, chunks: int, repetitions: int, out_dir: Path | None,
             plot: Path | None, as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """Every llama.cpp type with the importance matrix, plain Q4_0, the reference and NKAT variants: one
    calibration, perplexity on two texts (pydoc topics, licence texts), interleaved speed, the frontier.

    \b
    Default types: Q2_K Q3_K_S Q3_K_M Q3_K_L IQ3_XXS IQ3_S IQ4_XS IQ4_NL Q4_0 Q4_K_S Q4_K_M Q5_0
    Default theta: Q4_0:4 Q4_0:8 Q4_0:8:ffn IQ4_NL:4 IQ4_NL:8 IQ4_NL:8:attn IQ4_NL:8:ffn IQ4_NL:12:ffn
                   IQ4_NL:16:ffn Q3_K_S:16
    """
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.compare import CompareSettings
    from nkat_gguf.evaluate.frontier import FrontierSettings, format_frontier, parse_theta_spec
    from nkat_gguf.evaluate.frontier import frontier as run_frontier

    defaults = FrontierSettings()
    specs = () if thetas == ("none",) else tuple(parse_theta_spec(t) for t in thetas) if thetas else defaults.thetas
    settings = FrontierSettings(
        types=_names(types) or defaults.types, thetas=specs,
        measure=CompareSettings(n_ctx=ctx, n_chunks=chunks, repetitions=repetitions), threads=threads or 0)
    result = run_frontier(resolve_model(input_),
                          _runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(ctx, settings.measure.n_prompt)),
                          settings, reference, calib_text, out_dir, plot)
    result["command"] = "nkat-gguf " + " ".join(sys.argv[1:])
    _emit(result, as_json, format_frontier)


@main.group()
def export() -> None:
    """Export an NKAT model for llama.cpp (--lora), Ollama or KoboldCpp, with gamma folded into theta's B.

    Every exported file is loaded back through llama.cpp before the export reports success.
    """


def _format_export(r: dict) -> str:
    lines = [f"wrote {role}: {path}" for role, path in r["files"].items()]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines + ["run:"] + [f"  {c}" for c in r["commands"]])


@export.command("adapter")
@click.argument("model")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Adapter GGUF to write.")
@click.option("--gamma", callback=_gamma, default=None, help="theta scale folded into B (default: the file's).")
@click.option("--type", "tensor_type", type=click.Choice(["F16", "F32"]), default="F16", show_default=True,
              help="Tensor type of the adapter's factors.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
def export_adapter_command(model: str, output: Path, gamma: float | None, tensor_type: str, as_json: bool) -> None:
    """theta as a llama.cpp LoRA adapter GGUF; apply it at scale 1 (llama-cli --lora)."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.export.exports import export_adapter

    _emit(export_adapter(resolve_model(model), output, gamma, tensor_type).as_dict(), as_json, _format_export)


@export.command("ollama")
@click.argument("model")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the model, the adapter and the Modelfile (created if missing).")
@click.option("--gamma", callback=_gamma, default=None, help="theta scale folded into B (default: the file's).")
@click.option("--name", default=None, help="Ollama model name (default: from the file name).")
@click.option("--merged", is_flag=True,
              help="One GGUF with W' = dequant(W_q) + gamma*B*A requantized, for Ollama releases that refuse ADAPTER.")
@click.option("--outtype", default=None,
              help="--merged: llama.cpp type for the merged file (Q4_K_M, Q8_0, ...); default keeps each tensor's type.")
@click.option("--ppl-chunks", type=click.IntRange(min=1), default=4, show_default=True,
              help="--merged: chunks of 512 tokens to measure perplexity on (theta off, adapter, merged).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
def export_ollama_command(model: str, output_dir: Path, gamma: float | None, name: str | None, merged: bool,
                          outtype: str | None, ppl_chunks: int, threads: int | None, as_json: bool) -> None:
    """A directory Ollama creates a model from: FROM the model, ADAPTER theta (or one merged GGUF)."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.export.exports import export_ollama

    report = export_ollama(resolve_model(model), output_dir, gamma, name, merged, outtype, ppl_chunks, threads=threads)
    _emit(report.as_dict(), as_json, _format_export)


@export.command("kobold")
@click.argument("model")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the adapter and the .kcpps (created if missing).")
@click.option("--gamma", callback=_gamma, default=None, help="theta scale folded into B (default: the file's).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="KoboldCpp threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
def export_kobold_command(model: str, output_dir: Path, gamma: float | None, threads: int | None,
                          as_json: bool) -> None:
    """The adapter plus a KoboldCpp .kcpps config; start it with koboldcpp --config."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.export.exports import export_kobold

    _emit(export_kobold(resolve_model(model), output_dir, gamma, threads).as_dict(), as_json, _format_export)


@main.command()
@click.argument("model", required=False)
@click.option("--gamma", callback=_gamma, default=None, help="theta scale (default: the file's).")
@click.option("--launch", metavar="NAME", default=None, help="Run the commands shown for this backend.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
def backends(model: str | None, gamma: float | None, launch: str | None, as_json: bool) -> None:
    """Runtimes installed here (llama-cpp-python, llama.cpp, KoboldCpp, Ollama) and the command for each."""
    from nkat_gguf.backends import detect, format_backends, resolve_target
    from nkat_gguf.backends import launch as run_launch
    from nkat_gguf.default_model import resolve_model

    target = resolve_target(resolve_model(model), gamma) if model else None
    found = detect(target)
    out = {"model": str(target.model) if target else None, "gamma": target.gamma if target else None,
           "backends": [b.as_dict() for b in found]}
    _emit(out, as_json, lambda r: format_backends(found, target))
    if launch:
        sys.exit(run_launch(found, launch))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(as_json: bool) -> None:
    """Check versions, CPU features, the default model and the cache; say what to fix. Exit 1 on a failure."""
    from nkat_gguf.doctor import FAIL, format_checks, run_checks

    checks = run_checks()
    _emit({"checks": [c.as_dict() for c in checks]}, as_json, lambda r: format_checks(checks))
    if any(c.status == FAIL for c in checks):
        sys.exit(1)


@main.command()
@click.argument("model")
@click.option("--gamma", callback=_gamma, default=None, help="theta scale (default: the file's).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--ctx", type=click.IntRange(min=16), default=4096, show_default=True, help="Context size in tokens.")
@engine_options
@_fail_cleanly
def serve(model: str, gamma: float | None, host: str, port: int, ctx: int, gpu_layers: int, no_cuda: bool,
          threads: int | None) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/models) with theta applied at gamma.

    A request may set "nkat_gamma" (a number, or null for theta off) to use another gamma without reloading.
    """
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.runtime import NkatRuntime
    from nkat_gguf.engine.server import ChatServer, is_loopback

    path = resolve_model(model)
    with NkatRuntime(path, _runtime_options(gpu_layers, no_cuda, threads, n_ctx=ctx), gamma=gamma) as runtime, \
            ChatServer(runtime, host, port) as server:
        theta = f"theta at gamma {runtime.gamma:g}" if runtime.gamma is not None else "no theta"
        click.echo(f"serving {path.name} ({theta}) at {server.url}  (Ctrl-C stops)", err=True)
        if not is_loopback(host):
            click.echo(f"warning: listening on {host} without authentication: anyone who can reach it can use "
                       "the model", err=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            click.echo("stopped", err=True)

@main.command()
@click.option("--model", "-m", default="default", show_default=True, help=MODEL_HELP)
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Study database, JSON reports, plot and best model (created if missing; rerun to continue).")
@click.option("--mode", default="quick", show_default=True, help="quick (12 trials), full (100) or custom (--trials).")
@click.option("--trials", type=int, default=None, help="Complete trials to reach with --mode custom.")
@click.option("--ranks", default="2,4,6,8", show_default=True, help="theta ranks to try; rank 0 (theta off) always is.")
@click.option("--gamma-range", default="0.90,0.99", show_default=True, help="LOW,HIGH for gamma (any range >= 0).")
@click.option("--pareto", is_flag=True, help="Minimize (perplexity, slowdown) and report the Pareto front.")
@click.option("--storage", default=None,
              help="Optuna RDB URL shared by workers, e.g. postgresql://user:pw@host/db "
                   "(default: SQLite in --output-dir).")
@click.option("--study-name", default="nkat-optimize", show_default=True, help="Study in the storage.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed; give each worker its own.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per perplexity chunk.")
@click.option("--chunks", type=int, default=4, show_default=True, help="Calibration-split chunks scored per trial.")
@click.option("--eval-chunks", type=int, default=8, show_default=True,
              help="Evaluation-split chunks of the best model's final comparison.")
@click.option("--n-gen", type=int, default=64, show_default=True,
              help="Generated tokens per speed run (tg of each rank, measured once per study).")
@click.option("--speed-repetitions", type=int, default=3, show_default=True,
              help="Interleaved speed runs per rank, and per side of the final comparison.")
@click.option("--outtype", default="Q4_0", show_default=True,
              help="llama.cpp quantization type theta corrects ('same' keeps the input's: requantizing a Q4_1 model "
                   "to Q4_1 loses nothing, so theta would be zero).")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Higher-precision GGUF theta aims at (default: the model).")
@click.option("--calib-text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text to calibrate and score trials on (default: the calibration split of pydoc topics).")
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text for the final comparison (default: the evaluation split of pydoc topics).")
@click.option("--json", "as_json", is_flag=True, help="Print the study summary as JSON.")
@engine_options
@_fail_cleanly
def optimize(model: str, output_dir: Path, mode: str, trials: int | None, ranks: str, gamma_range: str, pareto: bool,
             storage: str | None, study_name: str, seed: int, ctx: int, chunks: int, eval_chunks: int, n_gen: int,
             speed_repetitions: int, outtype: str, reference: Path | None, calib_text: Path | None, text: Path | None,
             as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """Optuna TPE search over theta rank and gamma for the best TPE score; resumable, shareable by workers."""
    from nkat_gguf.convert import ConvertOptions
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.optimizer.options import OptimizeOptions, parse_gamma_range, parse_ranks
    from nkat_gguf.optimizer.outputs import format_summary
    from nkat_gguf.optimizer.study import optimize as run_optimize

    progress = sys.stderr.isatty() or not as_json
    convert_options = ConvertOptions(input=resolve_model(model), output=output_dir, outtype=outtype,
                                     reference=reference, calib_text=calib_text, threads=threads or 0,
                                     progress=progress)
    summary = run_optimize(OptimizeOptions(
        convert=convert_options, output_dir=output_dir, mode=mode, trials=trials, ranks=parse_ranks(ranks),
        gamma_range=parse_gamma_range(gamma_range), pareto=pareto, storage=storage, study_name=study_name,
        seed=seed, n_ctx=ctx, chunks=chunks, eval_chunks=eval_chunks, eval_text=text, n_gen=n_gen,
        speed_repetitions=speed_repetitions,
        runtime=_runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(ctx, 512)), progress=progress))
    _emit(summary, as_json, format_summary)


if __name__ == "__main__":
    main()
