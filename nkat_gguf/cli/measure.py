"""`nkat-gguf perplexity`, `bench`, `compare`: one model measured in llama.cpp, theta off and on."""

from __future__ import annotations

from pathlib import Path

import click

from nkat_gguf.cli import options
from nkat_gguf.cli.errors import fail_cleanly
from nkat_gguf.cli.output import command_line, emit


@click.command()
@options.model()
@options.gamma()
@click.option("--no-theta", is_flag=True, help="Measure the plain quantized model (adapter removed).")
@options.text()
@options.ctx(default=None, show_default=False,
             help="Tokens per chunk, as llama-perplexity -c (default 512; with --kl-divergence, the base file's).")
@options.chunks(default=None, show_default=False, help="Chunks to score (default: all).")
@click.option("--kl-divergence-base", "kld_base", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="llama-perplexity's base file: written from this model, or with --kl-divergence read and "
                   "compared with (stock llama-perplexity reads and writes the same file).")
@click.option("--kl-divergence", "kld_compare", is_flag=True,
              help="Compare this model with the --kl-divergence-base file: KL divergence, Δp, same top.")
@click.option("--kld-base-model", "kld_base_model", cls=options.HiddenAliasOption, hidden_aliases=("--kld-reference",),
              type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The KLD base model (a GGUF, e.g. the unquantized model): its log-probabilities are computed in "
                   "this run (kept in --kl-divergence-base if given) and this model is compared with them.")
@options.as_json()
@options.engine_options
@fail_cleanly
def perplexity(model: str, gamma: float | None, no_theta: bool, text: Path | None, ctx: int | None,
               chunks: int | None, kld_base: Path | None, kld_compare: bool, kld_base_model: Path | None,
               as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """Perplexity exactly as llama.cpp's llama-perplexity computes it, and its KL divergence from a KLD base model."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.measure.kld import base_context, measure_model
    from nkat_gguf.engine.llama.probe import check_model
    from nkat_gguf.texts import load_text

    path = resolve_model(model)
    if kld_compare and kld_base is not None and kld_base_model is None:
        ctx = base_context(kld_base, ctx)
    ctx = 512 if ctx is None else ctx
    for file in (path, kld_base_model) if kld_base_model else (path,):
        check_model(file, ctx)
    content = None if kld_compare and text is None else load_text(text, "evaluation")
    out = measure_model(path, options.runtime_options(gpu_layers, no_cuda, threads, n_ctx=ctx, n_batch=ctx),
                        not no_theta, gamma, content, ctx, chunks, kld_base, kld_compare, kld_base_model)
    emit(out, as_json, format_perplexity)


def format_perplexity(r: dict) -> str:
    from nkat_gguf.engine.measure.kld import format_kld

    theta = "on, gamma " + format(r["gamma"], "g") if r["theta_enabled"] else "off"
    line = (f"perplexity {r['ppl']:.4f} ± {r['ppl_stderr']:.4f} over {r['n_chunks']} chunks of {r['n_ctx']} "
            f"({r['tokens_per_second']:.1f} tok/s, theta {theta})")
    if r["kld"] is None:
        return line + (f"\nwrote the KL-divergence base {r['kl_divergence_base']}" if r["kl_divergence_base"] else "")
    return line + "\n" + format_kld(r["kld"])


@click.command()
@options.model()
@options.gamma()
@click.option("--n-prompt", type=click.IntRange(min=1), default=512, show_default=True)
@options.n_gen()
@options.repetitions(default=5)
@options.as_json()
@options.engine_options
@fail_cleanly
def bench(model: str, gamma: float | None, n_prompt: int, n_gen: int, repetitions: int, as_json: bool,
          gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """Prompt (pp) and generation (tg) speed as llama-bench measures it, theta off and on, interleaved."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.measure.bench import device_name
    from nkat_gguf.engine.measure.speed import SpeedSettings, interleaved_speed
    from nkat_gguf.engine.llama.runtime import NkatRuntime
    from nkat_gguf.format.gguf_file import read_layout
    from nkat_gguf.format.hparams import check_context

    path = resolve_model(model)
    check_context(read_layout(path), n_prompt + n_gen, "--n-prompt + --n-gen")
    settings = SpeedSettings(repetitions=repetitions, n_prompt=n_prompt, n_gen=n_gen)
    runtime = options.runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(512, n_prompt + n_gen))
    with NkatRuntime(path, runtime) as rt:
        gammas = {"theta_off": None}
        if rt.has_theta:
            gammas["theta"] = rt.resolve_gamma(gamma)
        speed = interleaved_speed(rt, gammas, settings)
        context = {k: v for k, v in rt.options.llama_kwargs().items()
                   if k in ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "flash_attn")}
    main_config = speed.get("theta", speed["theta_off"])
    out = {"model": str(path), "tokens_per_second": main_config["tg_tokens_per_second"],
           "prompt_tokens_per_second": main_config["pp_tokens_per_second"],
           "avg_latency_ms": main_config["avg_latency_ms"], "device": device_name(),
           "theta_enabled": "theta" in speed, "gamma": gammas.get("theta"),
           "overhead_percentage": (100.0 * (speed["theta_off"]["tg_tokens_per_second"]
                                            / speed["theta"]["tg_tokens_per_second"] - 1.0)) if "theta" in speed else 0.0,
           "repetitions": repetitions, "n_prompt": n_prompt, "n_gen": n_gen, "context": context, "runs": speed}
    emit(out, as_json, format_bench)


def format_bench(r: dict) -> str:
    lines = [f"{name:9} pp{r['n_prompt']} {s['pp_tokens_per_second']:8.1f} ± {s['pp_sd']:.1f} tok/s   "
             f"tg{r['n_gen']} {s['tg_tokens_per_second']:8.1f} ± {s['tg_sd']:.1f} tok/s   "
             f"{s['avg_latency_ms']:.2f} ms/token" for name, s in r["runs"].items()]
    c = r["context"]
    lines.append(f"context: flash attention {'on' if c['flash_attn'] else 'off'}, batch {c['n_batch']}/{c['n_ubatch']}, "
                 f"{c['n_threads']} threads (llama-bench's settings)")
    if r["theta_enabled"]:
        lines.append(f"theta generation overhead: {r['overhead_percentage']:+.1f} % (gamma {r['gamma']:g}, {r['device']})")
    return "\n".join(lines)


@click.command()
@options.model(default=None, show_default=False, required=True, help="NKAT GGUF written by 'nkat-gguf convert'.")
@options.reference(help="Reference GGUF for the gap (default: the embedded model when it is the file's reference).")
@options.gamma()
@options.text()
@options.ctx(help=None)
@options.chunks()
@options.repetitions(help="Interleaved speed repetitions per configuration.")
@options.as_json()
@options.engine_options
@fail_cleanly
def compare(model: str, reference: Path | None, gamma: float | None, text: Path | None, ctx: int, chunks: int,
            repetitions: int, as_json: bool, gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """theta off vs on in one run: tok/s, overhead, perplexity, and the share of the reference gap recovered."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.evaluate.compare import CompareSettings, format_compare
    from nkat_gguf.evaluate.compare import compare as run_compare
    from nkat_gguf.engine.llama.probe import check_model
    from nkat_gguf.format.gguf_file import read_layout
    from nkat_gguf.format.hparams import check_context
    from nkat_gguf.texts import load_text

    settings = CompareSettings(n_ctx=ctx, n_chunks=chunks, repetitions=repetitions)
    path = resolve_model(model)
    speed_ctx = settings.n_prompt + settings.n_gen  # the speed runs need this much context whatever --ctx is
    for file in (path, reference) if reference else (path,):
        check_model(file, ctx)
        check_context(read_layout(file), speed_ctx, f"the speed runs' {settings.n_prompt} + {settings.n_gen} tokens")
    runtime = options.runtime_options(gpu_layers, no_cuda, threads, n_ctx=max(ctx, speed_ctx), n_batch=ctx)
    result = run_compare(path, load_text(text, "evaluation"), runtime, settings, gamma,
                         Path(reference) if reference else None)
    result["command"] = command_line()
    emit(result, as_json, format_compare)
