"""Running a model outside and inside this tool: `nkat-gguf export`, `backends`, `serve`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import click

from nkat_gguf.cli import options
from nkat_gguf.cli.errors import fail_cleanly
from nkat_gguf.cli.output import emit
from nkat_gguf.export.targets import ADAPTER, KOBOLD, OLLAMA

FOLDED_GAMMA_HELP = "theta scale folded into B (default: the file's)."


def _adapter_types() -> Sequence[str]:
    from nkat_gguf.engine.llama.adapter import ADAPTER_TYPES

    return sorted(ADAPTER_TYPES)


@click.group()
def export() -> None:
    """Export an NKAT model for llama.cpp (--lora), Ollama or KoboldCpp, with gamma folded into theta's B.

    Every exported file is loaded back through llama.cpp before the export reports success.
    """


def format_export(r: dict) -> str:
    lines = [f"wrote {role}: {path}" for role, path in r["files"].items()]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines + ["run:"] + [f"  {c}" for c in r["commands"]])


@export.command(ADAPTER)
@options.model_argument()
@options.output(help="Adapter GGUF to write.")
@options.gamma(help=FOLDED_GAMMA_HELP)
@click.option("--type", "tensor_type", type=options.LazyChoice(_adapter_types), default="F16", show_default=True,
              help="Tensor type of the adapter's factors.")
@options.as_json()
@fail_cleanly
def export_adapter_command(model: str, output: Path, gamma: float | None, tensor_type: str, as_json: bool) -> None:
    """theta as a llama.cpp LoRA adapter GGUF; apply it at scale 1 (llama-cli --lora)."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.export.exports import export_adapter

    emit(export_adapter(resolve_model(model), output, gamma, tensor_type).as_dict(), as_json, format_export)


@export.command(OLLAMA)
@options.model_argument()
@options.output_dir(help="Directory for the model, the adapter and the Modelfile (created if missing).")
@options.gamma(help=FOLDED_GAMMA_HELP)
@click.option("--name", default=None, help="Ollama model name (default: from the file name).")
@click.option("--merged", is_flag=True,
              help="One GGUF with W' = dequant(W_q) + gamma*B*A requantized, for Ollama releases that refuse ADAPTER.")
@options.outtype(default=None, show_default=False,
                 help="--merged: llama.cpp type for the merged file (Q4_K_M, Q8_0, ...); default keeps each tensor's "
                      "type.")
@click.option("--ppl-chunks", type=click.IntRange(min=1), default=4, show_default=True,
              help="--merged: chunks of 512 tokens to measure perplexity on (theta off, adapter, merged).")
@options.threads(help="CPU threads (default: all cores).")
@options.as_json()
@fail_cleanly
def export_ollama_command(model: str, output_dir: Path, gamma: float | None, name: str | None, merged: bool,
                          outtype: str | None, ppl_chunks: int, threads: int | None, as_json: bool) -> None:
    """A directory Ollama creates a model from: FROM the model, ADAPTER theta (or one merged GGUF)."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.export.exports import export_ollama

    report = export_ollama(resolve_model(model), output_dir, gamma, name, merged, outtype, ppl_chunks, threads=threads)
    emit(report.as_dict(), as_json, format_export)


@export.command(KOBOLD)
@options.model_argument()
@options.output_dir(help="Directory for the adapter and the .kcpps (created if missing).")
@options.gamma(help=FOLDED_GAMMA_HELP)
@options.threads(help="KoboldCpp threads (default: all cores).")
@options.as_json()
@fail_cleanly
def export_kobold_command(model: str, output_dir: Path, gamma: float | None, threads: int | None,
                          as_json: bool) -> None:
    """The adapter plus a KoboldCpp .kcpps config; start it with koboldcpp --config."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.export.exports import export_kobold

    emit(export_kobold(resolve_model(model), output_dir, gamma, threads).as_dict(), as_json, format_export)


@click.command()
@options.model_argument(required=False)
@options.gamma()
@click.option("--launch", metavar="NAME", default=None, help="Run the commands shown for this backend.")
@options.as_json()
@fail_cleanly
def backends(model: str | None, gamma: float | None, launch: str | None, as_json: bool) -> None:
    """Runtimes installed here (llama-cpp-python, llama.cpp, KoboldCpp, Ollama) and the command for each."""
    from nkat_gguf.backends import detect, format_backends, resolve_target
    from nkat_gguf.backends import launch as run_launch
    from nkat_gguf.default_model import resolve_model

    target = resolve_target(resolve_model(model), gamma) if model else None
    found = detect(target)
    out = {"model": str(target.model) if target else None, "gamma": target.gamma if target else None,
           "backends": [b.as_dict() for b in found]}
    emit(out, as_json, lambda r: format_backends(found, target))
    if launch:
        sys.exit(run_launch(found, launch))


@click.command()
@options.model_argument()
@options.gamma()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@options.ctx(type=click.IntRange(min=16), default=None, show_default=False,
             help="Context size in tokens (default: 4096, or the model's trained context if smaller).")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait while one generates; more get 503 with Retry-After.")
@click.option("--queue-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Seconds a request may wait for its turn before a 503.")
@options.engine_options
@fail_cleanly
def serve(model: str, gamma: float | None, host: str, port: int, ctx: int | None, max_queue: int,
          queue_timeout: float, gpu_layers: int, no_cuda: bool, threads: int | None) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/models) with theta applied at gamma.

    A request may set "nkat_gamma" (a number, or null for theta off) to use another gamma without reloading.
    """
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.engine.llama.runtime import NkatRuntime
    from nkat_gguf.engine.serve.server import ChatServer, is_loopback
    from nkat_gguf.format import nkat
    from nkat_gguf.format.gguf_file import read_layout
    from nkat_gguf.format.hparams import n_ctx_train

    path = resolve_model(model)
    ctx = ctx or min(4096, n_ctx_train(read_layout(path)))
    with NkatRuntime(path, options.runtime_options(gpu_layers, no_cuda, threads, n_ctx=ctx), gamma=gamma) as runtime, \
            ChatServer(runtime, host, port, max_queue=max_queue, queue_timeout_s=queue_timeout) as server:
        theta = f"theta at gamma {runtime.gamma:g}" if runtime.gamma is not None else "no theta"
        temperature = (f"default temperature {server.default_temperature:.4g} from {nkat.TEMPERATURE}"
                       if server.default_temperature is not None else "default temperature: llama-cpp-python's")
        click.echo(f"serving {path.name} ({theta}, {temperature}) at {server.url}  (Ctrl-C stops)", err=True)
        if not is_loopback(host):
            click.echo(f"warning: listening on {host} without authentication: anyone who can reach it can use "
                       "the model", err=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            click.echo("stopped", err=True)
