"""`nkat-gguf optimize`: the Optuna study over convert's knobs and gamma (nkat_gguf.optimizer)."""

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
@options.byte_budget(default="", metavar="SIZES",
                     help="Also search convert's allocation of types and theta ranks (as convert --byte-budget, "
                          "e.g. 1%,3%; 'none', one rank on every weight, is always a choice): one convert per "
                          "budget, base type and --theta-weights value, built when a trial first needs it. With "
                          "convert's default budget among them, convert's default is tried third.")
@options.theta_budget(default="", metavar="SIZES", hidden_aliases=("--budgets",),
                      help="Also search theta-only budgets (as convert --theta-budget: MiB or % of the file, e.g. "
                           "1MiB,3%): a trial then gives each weight its own rank, at most the trial's rank, cut from "
                           "the base's theta, or uses one rank ('none'). The per-kind sensitivity is measured once "
                           "per study on calibration text.")
@options.theta_weights(default="", metavar="NS", hidden_aliases=("--max-weights",),
                       help="With a budget: how many weights may carry theta, the values to search, e.g. 0,15,30 "
                            "(0: theta on no weight; default: convert's default alone).")
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
@options.outtype(metavar="TYPE[,TYPE...]",
                 help="llama.cpp quantization type theta corrects, or several to search ('same' keeps the input's: "
                      "requantizing a Q4_1 model to Q4_1 loses nothing, so theta would be zero).")
@options.reference(help="Higher-precision GGUF theta aims at (default: the model).")
@options.calib_text(help="UTF-8 text to calibrate and score trials on (default: the calibration split of pydoc "
                         "topics).")
@options.text(help="UTF-8 text for the final comparison (default: the evaluation split of pydoc topics).")
@options.as_json(help="Print the study summary as JSON.")
@options.engine_options
@fail_cleanly
def optimize(model: str, output_dir: Path, mode: str, trials: int | None, ranks: str, gamma_range: str,
             byte_budget: str, theta_budget: str, theta_weights: str, pareto: bool, storage: str | None, study_name: str, seed: int, ctx: int,
             chunks: int, eval_chunks: int, n_gen: int, speed_repetitions: int, outtype: str,
             reference: Path | None, calib_text: Path | None, text: Path | None, as_json: bool, gpu_layers: int,
             no_cuda: bool, threads: int | None) -> None:
    """Optuna TPE search over convert's knobs (base type, byte budget, theta weights, theta rank, theta budget) and
    gamma for the best TPE score; resumable, shareable."""
    from nkat_gguf.convert import ConvertOptions
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.optimizer.options import OptimizeOptions, parse_counts, parse_gamma_range, parse_list, parse_ranks
    from nkat_gguf.optimizer.outputs import format_summary
    from nkat_gguf.optimizer.study import optimize as run_optimize

    progress = progress_wanted(as_json)
    outtypes = parse_list(outtype) or (outtype,)
    convert_options = ConvertOptions(input=resolve_model(model), output=output_dir, outtype=outtypes[0],
                                     reference=reference, calib_text=calib_text, threads=threads or 0,
                                     progress=progress)
    runtime = options.runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(ctx, 512), n_batch=ctx)
    summary = run_optimize(OptimizeOptions(
        convert=convert_options, output_dir=output_dir, mode=mode, trials=trials, ranks=parse_ranks(ranks),
        gamma_range=parse_gamma_range(gamma_range), outtypes=outtypes if len(outtypes) > 1 else (),
        byte_budgets=parse_list(byte_budget), theta_budgets=parse_list(theta_budget),
        theta_weights=parse_counts(theta_weights), pareto=pareto, storage=storage, study_name=study_name,
        seed=seed, n_ctx=ctx, chunks=chunks, eval_chunks=eval_chunks, eval_text=text, n_gen=n_gen,
        speed_repetitions=speed_repetitions, runtime=runtime, progress=progress))
    emit(summary, as_json, format_summary)
