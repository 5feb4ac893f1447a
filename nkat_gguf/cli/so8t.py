"""`nkat-gguf so8t train`: learn SO8T rotation gates on a frozen model (nkat_gguf.so8t.train)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nkat_gguf.cli import options
from nkat_gguf.cli.errors import fail_cleanly
from nkat_gguf.cli.output import emit


@click.group()
def so8t() -> None:
    """Train SO8T rotation gates; bake the result with 'convert --so8t file:GATES.safetensors'."""


@so8t.command("train")
@options.model()
@options.output(help="Gate checkpoint to write (safetensors, docs/SO8T_CHECKPOINT.md); its training state is kept "
                     "beside it as OUTPUT.train-state.pt, and the same command resumes from it.")
@click.option("--objective", default="quant", show_default=True, metavar="quant|lm",
              help="quant: function-preserving R1 (+R2) minimising KL(reference || rotated fake-quantized model); "
                   "lm: one-sided gates W·(R·x) trained on the next-token loss.")
@options.outtype(help="quant: the llama.cpp type whose quantizer is emulated (Q4_0, IQ4_NL, Q8_0; Q4_1 approximate); "
                      "also the type of the report's quantized rows.")
@click.option("--no-imatrix", is_flag=True, help="quant: emulate quantizing without an importance matrix.")
@click.option("--heads", is_flag=True, help="quant: also train R2 per layer on the value heads.")
@click.option("--quant-layers", type=int, default=0, show_default=True,
              help="quant: fake-quantize only this many layers per step, drawn at random (0: every layer and the "
                   "head); the others need no rotation, which makes a step that much cheaper.")
@click.option("--gate", "gates", multiple=True, default=("attn_output",), show_default=True,
              help="lm: weight roles whose input is gated (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, "
                   "ffn_down); repeat for several.")
@click.option("--train-text", type=options.TEXT_FILE, default=None,
              help="UTF-8 training text (default: the calibration split of pydoc topics).")
@click.option("--eval-text", type=options.TEXT_FILE, default=None,
              help="UTF-8 evaluation text (default: the evaluation split).")
@click.option("--steps", type=int, default=40, show_default=True, help="Optimizer steps in all (resume included).")
@click.option("--batch", type=int, default=2, show_default=True, help="Sequences per micro-batch.")
@options.ctx(default=128, help="Tokens per sequence.")
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
@options.report_dir(help="Write so8t-train.json/.md, sigma.png, loss.png, blocks.png and the final perplexities.")
@click.option("--report-chunks", type=click.IntRange(min=1), default=8, show_default=True,
              help="Chunks of 512 per text for the report's final perplexities.")
@options.threads(help="Torch and llama.cpp threads.")
@options.seed(help="Torch seed.")
@options.as_json(help="Print the result as JSON.")
@fail_cleanly
def so8t_train(model: str, output: Path, objective: str, outtype: str, no_imatrix: bool, heads: bool,
               quant_layers: int, gates: tuple[str, ...], train_text: Path | None, eval_text: Path | None,
               steps: int, batch: int, ctx: int, accumulate: int, lr: float, lambda_max: float, warmup: int,
               device: str, dtype: str, checkpoint_every: int, eval_every: int, eval_sequences: int,
               report_dir: Path | None, report_chunks: int, threads: int | None, seed: int, as_json: bool) -> None:
    """Learn SO8T rotations R = exp(sigmoid(alpha)·A) on a frozen model; write the gate checkpoint."""
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.evaluate.so8t_training import final_perplexities, write_report
    from nkat_gguf.so8t.qc import check_report_dir
    from nkat_gguf.so8t.train import TrainOptions, check_options, train

    opts = TrainOptions(model=resolve_model(model), output=output, objective=objective, outtype=outtype.upper(),
                        imatrix=not no_imatrix, heads=heads, quant_layers=quant_layers, gate_weights=tuple(gates),
                        train_text=train_text, eval_text=eval_text, steps=steps, batch=batch, ctx=ctx,
                        accumulate=accumulate, lr=lr, lambda_max=lambda_max, warmup=warmup, device=device,
                        dtype=dtype, checkpoint_every=checkpoint_every, eval_every=eval_every,
                        eval_sequences=eval_sequences, threads=threads, seed=seed)
    check_options(opts)
    if report_dir is not None:
        check_report_dir(report_dir)
    result = train(opts)
    out: dict[str, Any] = {k: v for k, v in result.as_dict().items() if k not in ("history", "block_figures")}
    if report_dir is not None:
        final = final_perplexities(opts, report_chunks, threads, Path(output).resolve().parent)
        out["final"] = final
        out["report"] = [str(p) for p in write_report(report_dir, result, final)]
    emit(out, as_json, format_train)


def format_train(r: dict) -> str:
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
