"""`nkat-gguf quality` and `frontier`: tables that build several files from one model and measure them."""

from __future__ import annotations

from pathlib import Path

import click

from nkat_gguf.cli import options
from nkat_gguf.cli.errors import fail_cleanly
from nkat_gguf.cli.output import command_line, emit
from nkat_gguf.math.limits import DEFAULT_THETA_RANK

PPL_CHUNK_HELP = "Tokens per perplexity chunk."


@click.command()
@options.input_model()
@options.reference()
@options.outtype(help="llama.cpp quantization type of every variant.")
@options.theta_rank(type=click.IntRange(min=1), default=DEFAULT_THETA_RANK, show_default=True,
                    help="Rank of theta in the two theta rows.")
@options.calib_text()
@options.text(help="UTF-8 evaluation text (default: the evaluation split of Python's pydoc topics).")
@options.ctx(help=PPL_CHUNK_HELP)
@options.chunks(help="Evaluation chunks scored per row.")
@options.repetitions(help="Interleaved speed rounds over all five rows.")
@options.out_dir(help="Keep the four variant files here (default: a temporary directory, deleted afterwards).")
@options.as_json()
@options.engine_options
@fail_cleanly
def quality(input_: str, reference: Path | None, outtype: str, theta_rank: int, calib_text: Path | None,
            text: Path | None, ctx: int, chunks: int, repetitions: int, out_dir: Path | None, as_json: bool,
            gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """Reference, plain quantization, importance matrix, theta alone, importance matrix + theta: one run, one table."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.evaluate.quality import QualitySettings, format_quality_table, quality_table
    from nkat_gguf.texts import load_text

    settings = QualitySettings(outtype=outtype, theta_rank=theta_rank, n_ctx=ctx, n_chunks=chunks,
                               repetitions=repetitions)
    runtime = options.runtime_options(gpu_layers, no_cuda, threads,
                                      n_ctx=max(ctx, settings.n_prompt + settings.n_gen), n_batch=ctx)
    result = quality_table(resolve_model(input_), load_text(text, "evaluation"), runtime, settings, reference,
                           calib_text, out_dir)
    result["command"] = command_line()
    emit(result, as_json, format_quality_table)


def names(values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated options and comma-separated lists both work: --types Q4_0,IQ4_NL --types Q5_0."""
    return tuple(v.strip().upper() for value in values for v in value.split(",") if v.strip())


@click.command()
@options.input_model()
@options.reference()
@click.option("--types", multiple=True, metavar="TYPE[,TYPE...]",
              help="llama.cpp types to quantize with the importance matrix (default: Q2_K ... Q5_0, see below).")
@click.option("--theta", "thetas", multiple=True, metavar="BASE:RANK[:WEIGHTS][:key=value]",
              help="An NKAT variant: theta of RANK on the importance-matrix BASE type, on WEIGHTS (all, ffn, attn "
                   "or --selective-layers patterns joined by ','); RANK 'auto': types and ranks allocated as "
                   "convert does by default; key=value sets another convert option (byte_budget=3%, "
                   "theta_weights=15, ...). Repeatable; 'none' for no NKAT variant.")
@click.option("--mix", "mixes", multiple=True, metavar="BASE:PATTERN=TYPE[,...]|BASE:key=value",
              help="A llama.cpp per-tensor mix without theta: tensor types by hand (IQ4_NL:blk.*.attn_v.weight=Q8_0) "
                   "or the allocator's types (IQ4_NL:byte_budget=3%). Repeatable; 'none' for no mix.")
@options.calib_text()
@options.ctx(help=PPL_CHUNK_HELP)
@options.chunks(type=int, default=8, help="Chunks scored per file and text.")
@options.repetitions(help="Interleaved speed rounds over all files, at least.")
@click.option("--ratio-halfwidth", type=click.FloatRange(min=0, min_open=True), default=0.03, show_default=True,
              help="More rounds, up to --max-repetitions, until every θ file's speed ratio to itself with θ off "
                   "has a 95 % interval at most this wide on each side.")
@click.option("--max-repetitions", type=click.IntRange(min=1), default=12, show_default=True,
              help="The most interleaved speed rounds.")
@options.out_dir()
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG of perplexity against file size, one panel per text.")
@options.as_json(help="Print JSON: one row per file, with its size and sha256.")
@options.engine_options
@fail_cleanly
def frontier(input_: str, reference: Path | None, types: tuple[str, ...], thetas: tuple[str, ...],
             mixes: tuple[str, ...], calib_text: Path | None, ctx: int, chunks: int, repetitions: int,
             ratio_halfwidth: float, max_repetitions: int, out_dir: Path | None,
             plot: Path | None, as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """Every llama.cpp type with the importance matrix, plain Q4_0, the reference and NKAT variants: one
    calibration, perplexity on two texts (pydoc topics, licence texts), interleaved speed, the frontier.

    \b
    Default types: Q2_K Q3_K_S Q3_K_M Q3_K_L IQ3_XXS IQ3_S IQ4_XS IQ4_NL Q4_0 Q4_K_S Q4_K_M Q5_0
    Default theta: IQ4_NL:auto Q4_0:4 Q4_0:8 Q4_0:8:ffn IQ4_NL:4 IQ4_NL:8 IQ4_NL:8:attn IQ4_NL:8:ffn
                   IQ4_NL:12:ffn IQ4_NL:16:ffn Q3_K_S:16   (IQ4_NL:auto is convert's default)
    Default mixes: IQ4_NL:blk.*.attn_v.weight=Q5_0,blk.*.ffn_down.weight=Q5_0
                   IQ4_NL:blk.*.attn_v.weight=Q8_0,blk.*.ffn_down.weight=Q5_1  IQ4_NL:byte_budget=3%
    """
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.evaluate.compare import CompareSettings
    from nkat_gguf.evaluate.frontier import FrontierSettings, format_frontier, parse_mix_spec, parse_theta_spec
    from nkat_gguf.evaluate.frontier import frontier as run_frontier

    defaults = FrontierSettings()
    specs = () if thetas == ("none",) else tuple(parse_theta_spec(t) for t in thetas) if thetas else defaults.thetas
    mix_specs = () if mixes == ("none",) else tuple(parse_mix_spec(m) for m in mixes) if mixes else defaults.mixes
    settings = FrontierSettings(
        types=names(types) or defaults.types, thetas=specs, mixes=mix_specs,
        measure=CompareSettings(n_ctx=ctx, n_chunks=chunks, repetitions=repetitions, ratio_halfwidth=ratio_halfwidth,
                                max_repetitions=max(repetitions, max_repetitions)), threads=threads or 0)
    runtime = options.runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(ctx, settings.measure.n_prompt))
    result = run_frontier(resolve_model(input_), runtime, settings, reference, calib_text, out_dir, plot)
    result["command"] = command_line()
    emit(result, as_json, format_frontier)
