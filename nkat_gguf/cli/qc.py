"""`nkat-gguf qc`: SO8T before/after (bake), confidence (ECE, Brier, fitted temperature), long text.

`qc calibration` is the old name of `qc confidence`: it still runs, and is not listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from nkat_gguf.cli import options
from nkat_gguf.cli.errors import fail_cleanly
from nkat_gguf.cli.output import command_line, emit
from nkat_gguf.math.limits import MIN_LONGTEXT_TOKENS, TEMPERATURE_RANGE


class AliasedGroup(click.Group):
    """A group whose old command names still resolve; `--help` lists the new names only."""

    def __init__(self, *args: object, aliases: dict[str, str] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.aliases = aliases or {}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))


def format_qc(qc: dict) -> str:
    verdict = "QC passed" if qc["passed"] else f"QC FAILED ({'; '.join(qc['failures'])})"
    blocks = ("" if qc["max_orthogonality_error"] is None else
              f", max ‖RᵀR − I‖_F {qc['max_orthogonality_error']:.2g}, min det {qc['min_det']:.6g}")
    return (f"{verdict}: max |Δz| {qc['max_abs_dz']:.3g}, mean KL {qc['mean_kl']:.3g}, max KL {qc['max_kl']:.3g}, "
            f"top-1 agreement {qc['top1_agreement']:.4f} over {qc['tokens']} tokens{blocks}")


@click.group(cls=AliasedGroup, aliases={"calibration": "confidence"})
def qc() -> None:
    """Quality checks: `qc bake` (SO8T before/after), `qc confidence` (ECE, Brier, temperature) and
    `qc longtext` (entropy and max logit over long text and generations)."""


@qc.command("bake")
@click.option("--pre", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="GGUF before baking (F32 weights for a meaningful comparison).")
@click.option("--post", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="GGUF after baking.")
@options.text(help="UTF-8 text; its first 128 tokens are compared (default: the evaluation split of pydoc topics).")
@options.as_json()
@fail_cleanly
def qc_bake(pre: Path, post: Path, text: Path | None, as_json: bool) -> None:
    """Logits of two GGUFs in llama.cpp (F32 KV cache): max |Δz|, KL, top-1; exit 1 if a QC gate is missed."""
    from nkat_gguf.so8t.qc import QCFailed, compare_ggufs, qc_text

    result = compare_ggufs(pre, post, qc_text(text))
    emit({"pre": str(pre), "post": str(post), **result.as_dict()}, as_json, format_qc)
    if not result.passed:
        raise QCFailed(f"SO8T QC failed: {result.summary()}")


def _rows_options(fn: Callable) -> Callable:
    """Options `qc confidence` and `qc longtext` share: the model, its reference and the evaluation text."""
    for option in reversed([
        options.model_argument(),
        options.reference(help="Reference GGUF measured beside the model (default: the embedded model when it is the "
                               "file's reference)."),
        click.option("--no-reference", is_flag=True, help="Measure no reference (when another run already did)."),
        options.gamma(help="theta scale of the 'theta on' row (default: the file's)."),
        options.text(help="UTF-8 evaluation text (default: the evaluation split of Python's pydoc topics)."),
        options.report_dir(help="Write the JSON and Markdown reports and the PNG plots here (created if missing)."),
        options.as_json(),
    ]):
        fn = option(fn)
    return options.engine_options(fn)


@qc.command("confidence", help=f"""
    Next-token ECE, Brier, NLL, top-1 and confidence, before and after a fitted temperature.

    Rows: theta at gamma, theta off (or the plain model) and the reference. T minimises NLL on the
    calibration text in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}]; the metrics are measured on the evaluation
    text at T = 1 and at T.
    """)
@_rows_options
@options.calib_text(help="UTF-8 text the temperature is fitted on (default: the calibration split of pydoc topics).")
@options.ctx()
@options.chunks(help="Evaluation chunks scored per configuration.")
@click.option("--calib-chunks", type=click.IntRange(min=1), default=2, show_default=True,
              help="Calibration chunks the temperature is fitted on (their logits are held in memory, ~50 MB "
                   "per chunk on a 49k vocabulary).")
@click.option("--write-temperature", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a copy of MODEL with the fitted temperature (theta at gamma) stored as "
                   "nkat.confidence.temperature; MODEL itself is never modified.")
@fail_cleanly
def qc_confidence(model: str, reference: Path | None, no_reference: bool, gamma: float | None, text: Path | None,
                  report_dir: Path | None, as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None,
                  calib_text: Path | None, ctx: int, chunks: int, calib_chunks: int,
                  write_temperature: Path | None) -> None:
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.evaluate.confidence import CalibrationSettings, calibration_report, fitted_temperature
    from nkat_gguf.evaluate.confidence import write_temperature as write_t
    from nkat_gguf.evaluate.qc_reports import format_calibration, write_calibration_report
    from nkat_gguf.format.atomic import check_writable_dir
    from nkat_gguf.texts import load_text

    path = resolve_model(model)
    if write_temperature is not None:
        check_writable_dir(write_temperature.resolve().parent)
    settings = CalibrationSettings(n_ctx=ctx, n_chunks=chunks, calib_chunks=calib_chunks)
    report = calibration_report(path, load_text(text, "evaluation"), load_text(calib_text, "calibration"),
                                options.runtime_options(gpu_layers, no_cuda, threads, n_ctx=ctx), settings, gamma,
                                reference, not no_reference)
    report["command"] = command_line()
    if write_temperature is not None:
        write_t(path, write_temperature, fitted_temperature(report))
        report["wrote_temperature"] = str(write_temperature)
    if report_dir is not None:
        report["report_files"] = [str(p) for p in write_calibration_report(report_dir, report)]
    emit(report, as_json, format_calibration)


@qc.command("longtext")
@_rows_options
@click.option("--tokens", type=click.IntRange(min=MIN_LONGTEXT_TOKENS), default=2048, show_default=True,
              help="Teacher-forced window in tokens (capped, with a note, at the model's training context).")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Greedy new tokens per built-in prompt at most (an end-of-generation token stops earlier).")
@fail_cleanly
def qc_longtext(model: str, reference: Path | None, no_reference: bool, gamma: float | None, text: Path | None,
                report_dir: Path | None, as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None,
                tokens: int, gen_tokens: int) -> None:
    """Entropy and max logit over a long window and greedy generations: oscillation, drift, drops, repetition.

    Rows: theta at gamma, theta off (or the plain model) and the reference; prompts: three built-in long
    prompts (a scientific explanation, a mathematical proof, a technical implementation).
    """
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.evaluate.longtext import LongtextSettings, longtext_report, without_series
    from nkat_gguf.evaluate.qc_reports import format_longtext, write_longtext_report
    from nkat_gguf.texts import load_text

    report = longtext_report(resolve_model(model), load_text(text, "evaluation"),
                             options.runtime_options(gpu_layers, no_cuda, threads),
                             LongtextSettings(tokens=tokens, gen_tokens=gen_tokens), gamma, reference, not no_reference)
    report["command"] = command_line()
    if report_dir is not None:
        report["report_files"] = [str(p) for p in write_longtext_report(report_dir, report)]
    emit(without_series(report), as_json, format_longtext)
