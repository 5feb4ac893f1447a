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

from . import __version__
from .errors import NkatError

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
    from engine.runtime import RuntimeOptions

    return RuntimeOptions(n_ctx=n_ctx, n_batch=max(n_ctx, 512), n_threads=threads,
                          n_gpu_layers=0 if no_cuda else gpu_layers, **extra)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--outtype", default="same", show_default=True,
              help="llama.cpp quantization type (Q4_0, Q4_K_M, Q8_0, F16, ...) or 'same' as the input.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Higher-precision GGUF of the same model whose weights theta aims at (default: the input).")
@click.option("--theta-rank", type=int, default=4, show_default=True,
              help="Rank r of the correction per weight; 0 writes no theta.")
@click.option("--theta-gamma", callback=_gamma, default="0.97", show_default=True,
              help="Default gamma stored in the file (1 applies the full correction).")
@click.option("--selective-layers", multiple=True, metavar="NAME",
              help="Only these weights: GGUF names, globs (blk.*.ffn_*) or Meta/HF names. Repeatable.")
@click.option("--calib-text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 calibration text (default: the calibration split of Python's pydoc topics).")
@click.option("--theta-calib", type=click.Choice(["activation", "none"]), default="activation", show_default=True,
              help="activation: SVD weighted by sqrt(E[x^2]) of each weight's inputs; none: plain SVD.")
@click.option("--imatrix", default="auto", show_default=True,
              help="Importance matrix for quantization: auto (from the calibration), none, or a llama.cpp "
                   "imatrix file (GGUF or legacy .dat).")
@click.option("--threads", type=int, default=0, help="Quantization threads (0: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@_fail_cleanly
def convert(input_: str, output: Path, outtype: str, reference: Path | None, theta_rank: int, theta_gamma: float,
            selective_layers: tuple[str, ...], calib_text: Path | None, theta_calib: str, imatrix: str,
            threads: int, as_json: bool) -> None:
    """Quantize a GGUF with llama.cpp and store theta (what quantization lost, low rank) in its metadata."""
    from .convert import ConvertOptions, convert as run_convert
    from .default_model import resolve_model

    report = run_convert(ConvertOptions(
        input=resolve_model(input_), output=output, outtype=outtype, reference=reference,
        theta_rank=theta_rank, theta_gamma=theta_gamma, selective_layers=list(selective_layers) or None,
        calib_text=calib_text, theta_calib=theta_calib, imatrix=imatrix, threads=threads,
        progress=sys.stderr.isatty() or not as_json))
    _emit(report.as_dict(), as_json, _format_convert)


def _format_convert(r: dict) -> str:
    mib = 1 << 20
    energy = [t["captured_energy"] for t in r["tensors"].values()]
    mean_energy = f"{100 * sum(energy) / len(energy):.1f} %" if energy else "n/a"
    lines = [f"wrote {r['output']} ({r['output_bytes'] / mib:.2f} MiB, {r['outtype']}, theta rank {r['theta_rank']} "
             f"on {len(r['tensors'])} weights, {r['theta_metadata_bytes'] / mib:.2f} MiB of theta metadata)",
             f"calibration: {r['calibration']}, importance matrix: {r['imatrix']}, "
             f"mean residual energy captured: {mean_energy}",
             "time: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items())]
    return "\n".join(lines + [f"note: {n}" for n in r["notes"]])


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
    from engine.perplexity import perplexity as run_perplexity, tokenize_text
    from engine.runtime import NkatRuntime

    from .default_model import resolve_model
    from .texts import load_text

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
    from engine.compare import CompareSettings, interleaved_speed
    from engine.bench import device_name
    from engine.runtime import NkatRuntime

    from .default_model import resolve_model

    path = resolve_model(model)
    settings = CompareSettings(n_ctx=max(n_prompt, n_gen), repetitions=repetitions, n_prompt=n_prompt, n_gen=n_gen)
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
    from engine.compare import CompareSettings, compare as run_compare, format_compare

    from .default_model import resolve_model
    from .texts import load_text

    settings = CompareSettings(n_ctx=ctx, n_chunks=chunks, repetitions=repetitions)
    result = run_compare(resolve_model(model), load_text(text, "evaluation"),
                         _runtime_options(gpu_layers, no_cuda, threads, n_ctx=ctx), settings, gamma,
                         Path(reference) if reference else None)
    result["command"] = "nkat-gguf " + " ".join(sys.argv[1:])
    _emit(result, as_json, format_compare)


if __name__ == "__main__":
    main()
