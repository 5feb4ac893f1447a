"""`nkat-gguf optimize`: the Optuna study over theta rank, budget and gamma (nkat_gguf.optimizer)."""

from __future__ import annotations

from pathlib import Path

import click

from nkat_gguf.cli import options
from nkat_gguf.cli.errors import fail_cleanly
from nkat_gguf.cli.output import emit, progress_wanted


@click.command()
@options.model()
@options.output_dir("-o", help="Study database, JSON reports, plot and best model (created if missing; rerun to "
                               "continue).")
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
@options.seed(help="Sampler seed; give each worker its own.")
@options.ctx(help="Tokens per perplexity chunk.")
@options.chunks(type=int, default=4, help="Calibration-split chunks scored per trial.")
@click.option("--eval-chunks", type=int, default=8, show_default=True,
              help="Evaluation-split chunks of the best model's final comparison.")
@options.n_gen(type=int, default=64, help="Generated tokens per speed run (tg of each rank, measured once per study).")
@click.option("--speed-repetitions", type=int, default=3, show_default=True,
              help="Interleaved speed runs per rank, and per side of the final comparison.")
@options.outtype(help="llama.cpp quantization type theta corrects ('same' keeps the input's: requantizing a Q4_1 "
                      "model to Q4_1 loses nothing, so theta would be zero).")
@options.reference(help="Higher-precision GGUF theta aims at (default: the model).")
@options.calib_text(help="UTF-8 text to calibrate and score trials on (default: the calibration split of pydoc "
                         "topics).")
@options.text(help="UTF-8 text for the final comparison (default: the evaluation split of pydoc topics).")
@options.as_json(help="Print the study summary as JSON.")
@options.engine_options
@fail_cleanly
def optimize(model: str, output_dir: Path, mode: str, trials: int | None, ranks: str, gamma_range: str,
             budgets: str, max_weights: str, pareto: bool, storage: str | None, study_name: str, seed: int, ctx: int,
             chunks: int, eval_chunks: int, n_gen: int, speed_repetitions: int, outtype: str,
             reference: Path | None, calib_text: Path | None, text: Path | None, as_json: bool, gpu_layers: int,
             no_cuda: bool, threads: int | None) -> None:
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

    progress = progress_wanted(as_json)
    convert_options = ConvertOptions(input=resolve_model(model), output=output_dir, outtype=outtype,
                                     reference=reference, calib_text=calib_text, threads=threads or 0,
                                     progress=progress)
    runtime = options.runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(ctx, 512), n_batch=ctx)
    summary = run_optimize(OptimizeOptions(
        convert=convert_options, output_dir=output_dir, mode=mode, trials=trials, ranks=parse_ranks(ranks),
        gamma_range=parse_gamma_range(gamma_range), budgets=parse_budgets(budgets),
        max_weights=parse_max_weights(max_weights), pareto=pareto, storage=storage, study_name=study_name,
        seed=seed, n_ctx=ctx, chunks=chunks, eval_chunks=eval_chunks, eval_text=text, n_gen=n_gen,
        speed_repetitions=speed_repetitions, runtime=runtime, progress=progress))
    emit(summary, as_json, format_summary)
