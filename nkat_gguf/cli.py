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


def _non_finite(value: Any, where: str = "") -> str | None:
    """The path of the first NaN or infinity in a result (nested dicts and lists), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "result"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if (found := _non_finite(item, f"{where}.{key}" if where else str(key))) is not None:
            return found
    return None


def _emit(result: dict, as_json: bool, text: Callable[[dict], str]) -> None:
    """Print a result, never one holding NaN or infinity: such a figure is an error, not a measurement."""
    if (where := _non_finite(result)) is not None:
        raise NkatError(f"the result has a non-finite value at {where}: the model or its theta produced NaN or "
                        "infinity, so no figure is reported")
    click.echo(json.dumps(result, indent=2, default=str, allow_nan=False) if as_json else text(result))


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
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads for prompt and generation (default: one per physical core, as llama.cpp)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _runtime_options(gpu_layers: int, no_cuda: bool, threads: int | None, n_ctx: int = 512,
                     n_batch: int | None = None, **extra: Any):
    """`n_batch`: the most tokens one decode needs (a perplexity chunk decodes whole: n_ctx); default 512."""
    from nkat_gguf.engine.runtime import RuntimeOptions

    return RuntimeOptions(n_ctx=n_ctx, n_batch=min(n_ctx, n_batch or 512), n_threads=threads,
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
@click.option("--theta-budget", default=None, metavar="SIZE",
              help="Give each weight its own rank (0 included) within SIZE bytes of theta: MiB or % of the "
                   "quantized file, e.g. 2MiB or 3%. Ranks go where the residual's singular values times a "
                   "per-kind sensitivity (measured on the calibration text) buy most; --theta-rank is then unused.")
@click.option("--theta-max-weights", type=int, default=None, metavar="N",
              help="With --theta-budget: at most N weights carry theta. Each adds 4 llama.cpp graph operations "
                   "whatever its rank, so this caps the run-time cost.")
@click.option("--selective-layers", multiple=True, metavar="NAME",
              help="Only these weights: GGUF names, globs (blk.*.ffn_*; blk.* for all) or Meta/HF names. "
                   "Repeatable (default: see 'Defaults' below).")
@click.option("--calib-text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 calibration text (default: the calibration split of Python's pydoc topics).")
@click.option("--calib-tokens", type=int, default=None,
              help="Calibration tokens, in whole windows of 512, evaluated in llama.cpp (default: 16384, or all "
                   "whole windows of a shorter text). Cached per model, text and count.")
@click.option("--save-imatrix", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the calibration as a llama.cpp imatrix GGUF (llama-quantize --imatrix reads it).")
@click.option("--theta-calib", type=click.Choice(["activation", "none"]), default="activation", show_default=True,
              help="activation: SVD weighted by each weight's inputs (see --theta-fit); none: plain SVD.")
@click.option("--theta-fit", type=click.Choice(["diag", "whiten"]), default="whiten", show_default=True,
              help="whiten: the exact minimiser of the expected output error, from E[x xT] of each weight's input "
                   "(damped Cholesky); diag: columns scaled by sqrt(E[x^2]) only, inputs taken as uncorrelated.")
@click.option("--theta-damping", type=click.FloatRange(0, 10), default=None,
              help="Damping added as this fraction of the mean of E[x^2] (GPTQ-style) before the fit "
                   "(default: 0.01 for whiten, 0 for diag).")
@click.option("--theta-rounds", type=click.IntRange(1, 10), default=1, show_default=True,
              help="LoftQ-style joint fit: requantize W - B·A and refit theta this many rounds in all, keeping per "
                   "weight the round with the lowest expected output error (1: theta on llama.cpp's quantization).")
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
@click.option("--calibrate-temperature", is_flag=True,
              help="Fit the sampling temperature T that minimises NLL on the calibration text (theta at gamma, "
                   "4 chunks of 512) and store it as nkat.calibration.temperature; serve and the exports use it "
                   "as their default temperature.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@_fail_cleanly
def convert(input_: str, output: Path, outtype: str | None, reference: Path | None, theta_rank: int | None,
            theta_gamma: float,
            theta_budget: str | None, theta_max_weights: int | None, selective_layers: tuple[str, ...],
            calib_text: Path | None, calib_tokens: int | None,
            save_imatrix: Path | None, theta_calib: str, theta_fit: str, theta_damping: float | None,
            theta_rounds: int, imatrix: str, threads: int, so8t: str,
            so8t_seed: int | None, so8t_heads: bool, force: bool, report_dir: Path | None,
            optimize_rank: bool, calibrate_temperature: bool, as_json: bool) -> None:
    """Quantize a GGUF with llama.cpp and store theta (what quantization lost, low rank) in its metadata.

    \b
    Defaults, chosen from the frontier measurement in BENCHMARKS.md ("Frontier (issue 9)", with its
    command; partial, and no file there beat llama.cpp's own types on both texts: to be re-measured):
      --outtype IQ4_NL --theta-rank 8, theta on every attention/FFN weight
    """
    from nkat_gguf.convert import ConvertOptions
    from nkat_gguf.convert import convert as run_convert
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.so8t.bake_step import So8tOptions

    given = {"outtype": outtype, "theta_rank": theta_rank, "selective_layers": list(selective_layers) or None}
    options = ConvertOptions(
        input=resolve_model(input_), output=output, reference=reference, theta_gamma=theta_gamma,
        theta_budget=theta_budget, theta_max_weights=theta_max_weights,
        calib_text=calib_text, calib_tokens=calib_tokens, save_imatrix=save_imatrix, theta_calib=theta_calib,
        theta_fit=theta_fit, theta_damping=theta_damping, theta_rounds=theta_rounds, imatrix=imatrix, threads=threads,
        so8t=So8tOptions(mode=so8t, seed=so8t_seed, heads=so8t_heads, force=force, report_dir=report_dir),
        calibrate_temperature=calibrate_temperature, progress=sys.stderr.isatty() or not as_json,
        **{k: v for k, v in given.items() if v is not None})
    if optimize_rank:
        if calibrate_temperature:
            raise click.UsageError("--calibrate-temperature does not combine with --optimize-rank: run "
                                   "'nkat-gguf qc calibration BEST.gguf --write-temperature OUT' on the result")
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
    if allocation := r.get("allocation"):
        kinds = ", ".join(f"{k} {v['weights']}×Σr{v['total_rank']}" for k, v in allocation["ranks_by_kind"].items())
        lines.append(f"allocation: {allocation['spent_bytes'] / mib:.2f} of {allocation['budget_bytes'] / mib:.2f} MiB "
                     f"on {allocation['weights']} weights ({kinds or 'none'})")
    if r.get("temperature"):
        lines.append(f"calibrated temperature {r['temperature']['temperature']:.4f} (NLL on "
                     f"{r['temperature']['tokens']} calibration tokens), stored as nkat.calibration.temperature")
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
    """Quality checks: `qc bake` (SO8T before/after), `qc calibration` (ECE, Brier, temperature) and
    `qc longtext` (entropy and max logit over long text and generations)."""


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


def _qc_common(fn: Callable) -> Callable:
    """Options `qc calibration` and `qc longtext` share."""
    options = [
        click.argument("model"),
        click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Reference GGUF measured beside the model (default: the embedded model when it is the "
                          "file's reference)."),
        click.option("--no-reference", is_flag=True, help="Measure no reference (when another run already did)."),
        click.option("--gamma", callback=_gamma, default=None, help="theta scale of the 'theta on' row (default: the "
                                                                     "file's)."),
        click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="UTF-8 evaluation text (default: the evaluation split of Python's pydoc topics)."),
        click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Write the JSON and Markdown reports and the PNG plots here (created if missing)."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return engine_options(fn)


@qc.command("calibration")
@_qc_common
@click.option("--calib-text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text the temperature is fitted on (default: the calibration split of pydoc topics).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk, as llama-perplexity -c.")
@click.option("--chunks", type=click.IntRange(min=1), default=16, show_default=True,
              help="Evaluation chunks scored per configuration.")
@click.option("--calib-chunks", type=click.IntRange(min=1), default=2, show_default=True,
              help="Calibration chunks the temperature is fitted on (their logits are held in memory, ~50 MB "
                   "per chunk on a 49k vocabulary).")
@click.option("--write-temperature", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a copy of MODEL with the fitted temperature (theta at gamma) stored as "
                   "nkat.calibration.temperature; MODEL itself is never modified.")
@_fail_cleanly
def qc_calibration(model: str, reference: Path | None, no_reference: bool, gamma: float | None, text: Path | None,
                   report_dir: Path | None, as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None,
                   calib_text: Path | None, ctx: int, chunks: int, calib_chunks: int,
                   write_temperature: Path | None) -> None:
    """Next-token ECE, Brier, NLL, top-1 and confidence, before and after a fitted temperature.

    Rows: theta at gamma, theta off (or the plain model) and the reference. T minimises NLL on the
    calibration text in [0.5, 3.0]; the metrics are measured on the evaluation text at T = 1 and at T.
    """
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.confidence import CalibrationSettings, calibration_report, fitted_temperature
    from nkat_gguf.engine.confidence import write_temperature as write_t
    from nkat_gguf.evaluate.qc_reports import format_calibration, write_calibration_report
    from nkat_gguf.format.atomic import check_writable_dir
    from nkat_gguf.texts import load_text

    path = resolve_model(model)
    if write_temperature is not None:
        check_writable_dir(write_temperature.resolve().parent)
    settings = CalibrationSettings(n_ctx=ctx, n_chunks=chunks, calib_chunks=calib_chunks)
    report = calibration_report(path, load_text(text, "evaluation"), load_text(calib_text, "calibration"),
                                _runtime_options(gpu_layers, no_cuda, threads, n_ctx=ctx), settings, gamma,
                                reference, not no_reference)
    report["command"] = "nkat-gguf " + " ".join(sys.argv[1:])
    if write_temperature is not None:
        write_t(path, write_temperature, fitted_temperature(report))
        report["wrote_temperature"] = str(write_temperature)
    if report_dir is not None:
        report["report_files"] = [str(p) for p in write_calibration_report(report_dir, report)]
    _emit(report, as_json, format_calibration)


@qc.command("longtext")
@_qc_common
@click.option("--tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Teacher-forced window in tokens (capped, with a note, at the model's training context).")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Greedy new tokens per built-in prompt at most (an end-of-generation token stops earlier).")
@_fail_cleanly
def qc_longtext(model: str, reference: Path | None, no_reference: bool, gamma: float | None, text: Path | None,
                report_dir: Path | None,
                as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None, tokens: int,
                gen_tokens: int) -> None:
    """Entropy and max logit over a long window and greedy generations: oscillation, drift, drops, repetition.

    Rows: theta at gamma, theta off (or the plain model) and the reference; prompts: three built-in long
    prompts (a scientific explanation, a mathematical proof, a technical implementation).
    """
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.longtext import LongtextSettings, longtext_report, without_series
    from nkat_gguf.evaluate.qc_reports import format_longtext, write_longtext_report
    from nkat_gguf.texts import load_text

    report = longtext_report(resolve_model(model), load_text(text, "evaluation"),
                             _runtime_options(gpu_layers, no_cuda, threads),
                             LongtextSettings(tokens=tokens, gen_tokens=gen_tokens), gamma, reference, not no_reference)
    report["command"] = "nkat-gguf " + " ".join(sys.argv[1:])
    if report_dir is not None:
        report["report_files"] = [str(p) for p in write_longtext_report(report_dir, report)]
    _emit(without_series(report), as_json, format_longtext)


@main.group()
def so8t() -> None:
    """Train SO8T rotation gates; bake the result with 'convert --so8t file:GATES.safetensors'."""


@so8t.command("train")
@click.option("--model", "-m", default="default", show_default=True, help=MODEL_HELP)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Gate checkpoint to write (safetensors, docs/SO8T_CHECKPOINT.md); its training state is kept "
                   "beside it as OUTPUT.train-state.pt, and the same command resumes from it.")
@click.option("--objective", default="quant", show_default=True, metavar="quant|lm",
              help="quant: function-preserving R1 (+R2) minimising KL(reference || rotated fake-quantized model); "
                   "lm: one-sided gates W·(R·x) trained on the next-token loss.")
@click.option("--outtype", default="Q4_0", show_default=True,
              help="quant: the llama.cpp type whose quantizer is emulated (Q4_0, IQ4_NL, Q8_0; Q4_1 approximate); "
                   "also the type of the report's quantized rows.")
@click.option("--no-imatrix", is_flag=True, help="quant: emulate quantizing without an importance matrix.")
@click.option("--heads", is_flag=True, help="quant: also train R2 per layer on the value heads.")
@click.option("--quant-layers", type=int, default=0, show_default=True,
              help="quant: fake-quantize only this many layers per step, drawn at random (0: every layer and the "
                   "head); the others need no rotation, which makes a step that much cheaper.")
@click.option("--gate", "gates", multiple=True, default=("attn_output",), show_default=True,
              help="lm: weight roles whose input is gated (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, "
                   "ffn_down); repeat for several.")
@click.option("--train-text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 training text (default: the calibration split of pydoc topics).")
@click.option("--eval-text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 evaluation text (default: the evaluation split).")
@click.option("--steps", type=int, default=40, show_default=True, help="Optimizer steps in all (resume included).")
@click.option("--batch", type=int, default=2, show_default=True, help="Sequences per micro-batch.")
@click.option("--ctx", type=int, default=128, show_default=True, help="Tokens per sequence.")
@click.option("--accumulate", type=int, default=1, show_default=True, help="Micro-batches per step.")
@click.option("--lr", type=float, default=0.02, show_default=True, help="Adam learning rate of A and alpha.")
@click.option("--lambda-max", type=float, default=1e-2, show_default=True,
              help="Regulariser weight after warm-up: lambda(t) = lambda_max * min(1, t / warmup).")
@click.option("--warmup", type=int, default=10, show_default=True, help="Steps of the regulariser's ramp.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda", help="Torch device.")
@click.option("--dtype", default="f32", show_default=True, metavar="f32|bf16",
              help="Precision of the frozen weights and activations (gates stay f32).")
@click.option("--checkpoint-every", type=int, default=10, show_default=True, help="Save the training state every N steps.")
@click.option("--eval-every", type=int, default=10, show_default=True, help="Evaluation loss every N steps.")
@click.option("--eval-sequences", type=int, default=2, show_default=True, help="Evaluation sequences of --ctx tokens.")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write so8t-train.json/.md, sigma.png, loss.png, blocks.png and the final perplexities.")
@click.option("--report-chunks", type=click.IntRange(min=1), default=8, show_default=True,
              help="Chunks of 512 per text for the report's final perplexities.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch and llama.cpp threads.")
@click.option("--seed", type=int, default=0, show_default=True, help="Torch seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_fail_cleanly
def so8t_train(model: str, output: Path, objective: str, outtype: str, no_imatrix: bool, heads: bool,
               quant_layers: int, gates: tuple[str, ...], train_text: Path | None, eval_text: Path | None, steps: int, batch: int,
               ctx: int, accumulate: int, lr: float, lambda_max: float, warmup: int, device: str, dtype: str,
               checkpoint_every: int, eval_every: int, eval_sequences: int, report_dir: Path | None,
               report_chunks: int, threads: int | None, seed: int, as_json: bool) -> None:
    """Learn SO8T rotations R = exp(sigmoid(alpha)·A) on a frozen model; write the gate checkpoint."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.evaluate.so8t_training import final_perplexities, write_report
    from nkat_gguf.so8t.qc import check_report_dir
    from nkat_gguf.so8t.train import TrainOptions, check_options, train

    opts = TrainOptions(model=resolve_model(model), output=output, objective=objective, outtype=outtype.upper(),
                        imatrix=not no_imatrix, heads=heads, quant_layers=quant_layers, gate_weights=tuple(gates), train_text=train_text,
                        eval_text=eval_text, steps=steps, batch=batch, ctx=ctx, accumulate=accumulate, lr=lr,
                        lambda_max=lambda_max, warmup=warmup, device=device, dtype=dtype,
                        checkpoint_every=checkpoint_every, eval_every=eval_every, eval_sequences=eval_sequences,
                        threads=threads, seed=seed)
    check_options(opts)
    if report_dir is not None:
        check_report_dir(report_dir)
    result = train(opts)
    out: dict[str, Any] = {k: v for k, v in result.as_dict().items() if k not in ("history", "block_figures")}
    if report_dir is not None:
        final = final_perplexities(opts, report_chunks, threads, Path(output).resolve().parent)
        out["final"] = final
        out["report"] = [str(p) for p in write_report(report_dir, result, final)]
    _emit(out, as_json, _format_train)


def _format_train(r: dict) -> str:
    sigmas = [g["sigma"] for g in r["gates"].values()]
    opened = sum(g["opened_step"] is not None for g in r["gates"].values())
    lines = [f"trained {len(sigmas)} {r['objective']} gate(s) to step {r['steps']} in {r['seconds']:.1f} s "
             f"({r['tokens_per_second']:.1f} tokens/s): sigma {min(sigmas):.4g}..{max(sigmas):.4g}, "
             f"{opened} opened; eval loss {r['evals'][0]['eval_loss']:.5g} -> {r['evals'][-1]['eval_loss']:.5g}",
             f"wrote {r['output']}"]
    for label, row in (r.get("final") or {}).get("rows", {}).items():
        ppl = ", ".join(f"{k} {v['ppl']:.4f}" for k, v in row.items() if isinstance(v, dict) and "ppl" in v)
        lines.append(f"  {label}: {ppl}")
    lines += [f"report: {p}" for p in r.get("report", [])[:1]]
    return "\n".join(lines)


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
    from nkat_gguf.engine.probe import check_model
    from nkat_gguf.engine.runtime import NkatRuntime
    from nkat_gguf.texts import load_text

    path = resolve_model(model)
    check_model(path, ctx)
    content = load_text(text, "evaluation")
    with NkatRuntime(path, _runtime_options(gpu_layers, no_cuda, threads, n_ctx=ctx, n_batch=ctx)) as rt:
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
    from nkat_gguf.format.gguf_file import read_layout
    from nkat_gguf.format.hparams import check_context

    path = resolve_model(model)
    check_context(read_layout(path), n_prompt + n_gen, "--n-prompt + --n-gen")
    settings = SpeedSettings(repetitions=repetitions, n_prompt=n_prompt, n_gen=n_gen)
    with NkatRuntime(path, _runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(512, n_prompt + n_gen))) as rt:
        gammas = {"baseline": None}
        if rt.has_theta:
            gammas["theta"] = gamma if gamma is not None else rt.default_gamma
        speed = interleaved_speed(rt, gammas, settings)
        context = {k: v for k, v in rt.options.llama_kwargs().items()
                   if k in ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "flash_attn")}
    main_config = speed.get("theta", speed["baseline"])
    out = {"model": str(path), "tokens_per_second": main_config["tg_tokens_per_second"],
           "prompt_tokens_per_second": main_config["pp_tokens_per_second"],
           "avg_latency_ms": main_config["avg_latency_ms"], "device": device_name(),
           "theta_enabled": "theta" in speed, "gamma": gammas.get("theta"),
           "overhead_percentage": (100.0 * (speed["baseline"]["tg_tokens_per_second"]
                                            / speed["theta"]["tg_tokens_per_second"] - 1.0)) if "theta" in speed else 0.0,
           "repetitions": repetitions, "n_prompt": n_prompt, "n_gen": n_gen, "context": context, "runs": speed}
    _emit(out, as_json, _format_bench)


def _format_bench(r: dict) -> str:
    lines = [f"{name:9} pp{r['n_prompt']} {s['pp_tokens_per_second']:8.1f} ± {s['pp_sd']:.1f} tok/s   "
             f"tg{r['n_gen']} {s['tg_tokens_per_second']:8.1f} ± {s['tg_sd']:.1f} tok/s   "
             f"{s['avg_latency_ms']:.2f} ms/token" for name, s in r["runs"].items()]
    c = r["context"]
    lines.append(f"context: flash attention {'on' if c['flash_attn'] else 'off'}, batch {c['n_batch']}/{c['n_ubatch']}, "
                 f"{c['n_threads']} threads (llama-bench's settings)")
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
    from nkat_gguf.engine.probe import check_model
    from nkat_gguf.format.gguf_file import read_layout
    from nkat_gguf.format.hparams import check_context
    from nkat_gguf.texts import load_text

    settings = CompareSettings(n_ctx=ctx, n_chunks=chunks, repetitions=repetitions)
    path = resolve_model(model)
    speed_ctx = settings.n_prompt + settings.n_gen  # the speed runs need this much context whatever --ctx is
    for file in (path, reference) if reference else (path,):
        check_model(file, ctx)
        check_context(read_layout(file), speed_ctx, f"the speed runs' {settings.n_prompt} + {settings.n_gen} tokens")
    result = run_compare(path, load_text(text, "evaluation"),
                         _runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(ctx, speed_ctx), n_batch=ctx),
                         settings, gamma, Path(reference) if reference else None)
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
                                            n_ctx=max(ctx, settings.n_prompt + settings.n_gen), n_batch=ctx),
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
@click.option("--ctx", type=click.IntRange(min=16), default=None,
              help="Context size in tokens (default: 4096, or the model's trained context if smaller).")
@engine_options
@_fail_cleanly
def serve(model: str, gamma: float | None, host: str, port: int, ctx: int | None, gpu_layers: int, no_cuda: bool,
          threads: int | None) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/models) with theta applied at gamma.

    A request may set "nkat_gamma" (a number, or null for theta off) to use another gamma without reloading.
    """
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.runtime import NkatRuntime
    from nkat_gguf.engine.server import ChatServer, is_loopback
    from nkat_gguf.format.gguf_file import read_layout
    from nkat_gguf.format.hparams import n_ctx_train

    path = resolve_model(model)
    ctx = ctx or min(4096, n_ctx_train(read_layout(path)))
    with NkatRuntime(path, _runtime_options(gpu_layers, no_cuda, threads, n_ctx=ctx), gamma=gamma) as runtime, \
            ChatServer(runtime, host, port) as server:
        theta = f"theta at gamma {runtime.gamma:g}" if runtime.gamma is not None else "no theta"
        temperature = (f"default temperature {server.default_temperature:.4g} from nkat.calibration.temperature"
                       if server.default_temperature is not None else "default temperature: llama-cpp-python's")
        click.echo(f"serving {path.name} ({theta}, {temperature}) at {server.url}  (Ctrl-C stops)", err=True)
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
@click.option("--budgets", default="", metavar="SIZES",
              help="Also search theta byte budgets (as convert --theta-budget: MiB or % of the file, e.g. 1MiB,3%): "
                   "a trial then gives each weight its own rank, at most the trial's rank, or uses uniform rank "
                   "('none'). The per-kind sensitivity is measured once per study on calibration text.")
@click.option("--max-weights", default="", metavar="NS",
              help="With --budgets: operation budgets to search (at most N weights carry theta), e.g. 30,60,90; "
                   "every weight is always a choice.")
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
def optimize(model: str, output_dir: Path, mode: str, trials: int | None, ranks: str, gamma_range: str,
             budgets: str, max_weights: str, pareto: bool,
             storage: str | None, study_name: str, seed: int, ctx: int, chunks: int, eval_chunks: int, n_gen: int,
             speed_repetitions: int, outtype: str, reference: Path | None, calib_text: Path | None, text: Path | None,
             as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """Optuna TPE search over theta rank, budget allocation and gamma for the best TPE score; resumable, shareable."""
    from nkat_gguf.convert import ConvertOptions
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.optimizer.options import (
        OptimizeOptions,
        parse_budgets,
        parse_gamma_range,
        parse_max_weights,
        parse_ranks,
    )
    from nkat_gguf.optimizer.outputs import format_summary
    from nkat_gguf.optimizer.study import optimize as run_optimize

    progress = sys.stderr.isatty() or not as_json
    convert_options = ConvertOptions(input=resolve_model(model), output=output_dir, outtype=outtype,
                                     reference=reference, calib_text=calib_text, threads=threads or 0,
                                     progress=progress)
    summary = run_optimize(OptimizeOptions(
        convert=convert_options, output_dir=output_dir, mode=mode, trials=trials, ranks=parse_ranks(ranks),
        gamma_range=parse_gamma_range(gamma_range), budgets=parse_budgets(budgets),
        max_weights=parse_max_weights(max_weights), pareto=pareto, storage=storage, study_name=study_name,
        seed=seed, n_ctx=ctx, chunks=chunks, eval_chunks=eval_chunks, eval_text=text, n_gen=n_gen,
        speed_repetitions=speed_repetitions,
        runtime=_runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(ctx, 512), n_batch=ctx), progress=progress))
    _emit(summary, as_json, format_summary)


if __name__ == "__main__":
    main()
