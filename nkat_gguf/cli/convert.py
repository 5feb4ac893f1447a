"""`nkat-gguf convert`: quantize with llama.cpp and store theta in the metadata (nkat_gguf.convert)."""

from __future__ import annotations

from pathlib import Path

import click

from nkat_gguf.cli import options
from nkat_gguf.cli.errors import fail_cleanly
from nkat_gguf.cli.output import emit, progress_wanted
from nkat_gguf.cli.qc import format_qc
from nkat_gguf.math.limits import (
    DAMPING_RANGE,
    DEFAULT_GAMMA,
    DEFAULT_SPEED_PRICE,
    DEFAULT_TRAIN_LR,
    DEFAULT_TRAIN_STEPS,
    DEFAULT_TRAIN_TOKENS,
    FIT_METHODS,
    ROUNDS_RANGE,
    THETA_CALIBS,
    THETA_TRAINS,
    TRAIN_LR_RANGE,
    TRAIN_STEPS_RANGE,
    TRAIN_TOKENS_RANGE,
)


def _tensor_types(_ctx: click.Context, _param: click.Parameter, items: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """--tensor-type PATTERN=TYPE, repeatable (a click callback, so the error names the option)."""
    pairs = []
    for item in items:
        pattern, sep, type_name = item.rpartition("=")
        if not sep or not pattern or not type_name:
            raise click.BadParameter(f"{item!r}: expected PATTERN=TYPE, e.g. blk.*.attn_v.weight=Q8_0")
        pairs.append((pattern, type_name))
    return tuple(pairs)


@click.command()
@options.input_model()
@options.output(type=click.Path(dir_okay=False, path_type=Path),
                help="Where to write the NKAT GGUF (written atomically; the input is never modified).")
@options.outtype(default=None, show_default=False,
                 help="llama.cpp quantization type (Q4_0, IQ4_NL, Q4_K_M, Q8_0, F16, ...) or 'same' as the input "
                      "(default: see 'Defaults' below).")
@options.reference(help="Higher-precision GGUF of the same model whose weights theta aims at (default: the input).")
@options.theta_rank(help="Theta of rank R on every selected weight instead of the allocation (0: no theta).")
@options.gamma(hidden_aliases=("--theta-gamma",), default=str(DEFAULT_GAMMA), show_default=True,
               help="Default gamma stored in the file (1 applies the full correction).")
@options.theta_budget(
              help="Theta ranks only (types stay the base's): give each weight its own rank (0 included) within "
                   "SIZE bytes of theta: MiB or % of the quantized file, e.g. 2MiB or 3%. Ranks go where the "
                   "residual's singular values times a per-kind sensitivity (measured on the calibration text) buy "
                   "most.")
@options.byte_budget(help="Allocate each weight's type (the steps llama.cpp writes for its row width) and theta rank "
                          "together within SIZE over the base type's file (MiB or %, e.g. 3%), by benefit per byte "
                          "(default: see 'Defaults' below; off with --theta-rank or --theta-budget unless given).")
@options.theta_weights(type=click.IntRange(min=0), hidden_aliases=("--op-budget", "--theta-max-weights"),
                       help="Under a budget, at most N weights carry theta (each adds 4 llama.cpp graph operations "
                            "whatever its rank); 0: theta on no weight, types only (default: see 'Defaults' below, "
                            "capped at the model's weights).")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE", callback=_tensor_types,
              help="Write the weights PATTERN names (as --selective-layers) at TYPE, as llama-quantize "
                   "--tensor-type; a type their rows cannot hold is refused. Repeatable.")
@click.option("--selective-layers", multiple=True, metavar="NAME",
              help="Only these weights may carry theta (and, under --byte-budget, change type): GGUF names, globs "
                   "(blk.*.ffn_*; blk.* for all) or Meta/HF names. Repeatable (default: every attention/FFN weight).")
@options.calib_text()
@click.option("--calib-tokens", type=int, default=None,
              help="Calibration tokens, in whole windows of 512, evaluated in llama.cpp (default: 16384, or all "
                   "whole windows of a shorter text). Cached per model, text and count.")
@click.option("--calib-memory", default=None, metavar="SIZE",
              help="Most bytes of second moments E[x xT] held at once (KiB, MiB, GiB); above it they are collected "
                   "and fitted per group of layers, one llama.cpp pass over the calibration windows per group "
                   "(default: 4GiB).")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Refuse, before any work and in one line with what it needs, a run whose peak resident memory "
                   "by the formula of docs/CALIBRATION.md (file, second moments, one weight's fit) exceeds SIZE "
                   "(KiB, MiB, GiB). Running out of memory anyway is one line too, and leaves nothing behind.")
@click.option("--save-imatrix", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the calibration as a llama.cpp imatrix GGUF (llama-quantize --imatrix reads it).")
@click.option("--theta-calib", type=click.Choice(THETA_CALIBS), default="activation", show_default=True,
              help="activation: SVD weighted by each weight's inputs (see --theta-fit); none: plain SVD.")
@click.option("--theta-fit", type=click.Choice(FIT_METHODS), default="whiten", show_default=True,
              help="whiten: the exact minimiser of the expected output error, from E[x xT] of each weight's input "
                   "(damped Cholesky); diag: columns scaled by sqrt(E[x^2]) only, inputs taken as uncorrelated.")
@click.option("--theta-damping", type=click.FloatRange(*DAMPING_RANGE), default=None,
              help="Damping added as this fraction of the mean of E[x^2] (GPTQ-style) before the fit "
                   "(default: 0.01 for whiten, 0 for diag).")
@click.option("--theta-rounds", type=click.IntRange(*ROUNDS_RANGE), default=1, show_default=True,
              help="LoftQ-style joint fit: requantize W - B·A and refit theta this many rounds in all, keeping per "
                   "weight the round with the lowest expected output error (1: theta on llama.cpp's quantization).")
@click.option("--theta-train", type=click.Choice(THETA_TRAINS), default="none", show_default=True,
              help="Train theta after its closed-form fit, the quantized weights frozen and theta in its stored INT8 "
                   "form: block matches each block's output to the reference's, block by block; model minimises "
                   "KL(p_ref || p) of the next-token distributions. On the first calibration windows; never ends "
                   "above the closed form's loss. Uses a GPU when torch sees one.")
@click.option("--theta-train-steps", type=click.IntRange(*TRAIN_STEPS_RANGE), default=DEFAULT_TRAIN_STEPS,
              show_default=True, help="Adam steps of --theta-train (per block with block).")
@click.option("--theta-train-lr", type=click.FloatRange(*TRAIN_LR_RANGE), default=DEFAULT_TRAIN_LR,
              show_default=True, help="Adam's step size, a fraction of each rank component's largest starting "
                                      "entry (1/127 of it is one INT8 step).")
@click.option("--theta-train-tokens", type=click.IntRange(*TRAIN_TOKENS_RANGE), default=DEFAULT_TRAIN_TOKENS,
              show_default=True, help="Calibration tokens --theta-train trains on, in whole windows of 512 "
                                      "(the first windows of the calibration text).")
@click.option("--speed-price", type=click.FloatRange(min=0), default=DEFAULT_SPEED_PRICE, show_default=True,
              help="Price each type by its measured speed on this CPU (a small probe, cached per CPU and llama.cpp "
                   "build): a type change that makes a weight x % slower must lower its error by this times x % of "
                   "the base type's. 0: types chosen by error per byte alone. Measure on a quiet machine: the "
                   "cache keeps the first probe ($NKAT_CACHE_DIR/type-speed).")
@click.option("--imatrix", default="auto", show_default=True,
              help="Importance matrix for quantization: auto (from the calibration), none, or a llama.cpp "
                   "imatrix file (GGUF or legacy .dat).")
@options.threads(type=int, default=0, help="Quantization threads (0: all cores).")
@click.option("--so8t", default="none", show_default=True, metavar="none|hadamard|random|file:PATH",
              help="Bake SO(8) rotations into the weights before quantizing: hadamard/random rotate the residual "
                   "stream (the function is kept), file:PATH.safetensors folds trained gates (docs/SO8T.md). "
                   "QC compares before and after; if it fails nothing is written.")
@click.option("--so8t-seed", type=click.IntRange(min=0), default=None,
              help="Seed of the random rotation, or of random signs on the Hadamard blocks.")
@click.option("--so8t-heads", is_flag=True, help="Also rotate each layer's value/output pair per head (R2).")
@click.option("--force", is_flag=True, help="Write even if SO8T QC fails (the file records it).")
@click.option("--report", "report_dir", type=options.DIRECTORY, default=None,
              help="Write the SO8T QC report (so8t-qc.json and so8t-qc.md) into this directory.")
@click.option("--optimize-rank", is_flag=True,
              help="Search rank and gamma with a quick Optuna study (nkat-gguf optimize --mode quick; study files in "
                   "OUTPUT.optimize/) and write the best model to --output; --theta-rank/--gamma are ignored.")
@click.option("--calibrate-temperature", is_flag=True,
              help="Fit the sampling temperature T that minimises NLL on the calibration text (theta at gamma, "
                   "4 chunks of 512) and store it as nkat.confidence.temperature; serve and the exports use it "
                   "as their default temperature.")
@options.as_json(help="Print a machine-readable summary.")
@fail_cleanly
def convert(input_: str, output: Path, outtype: str | None, reference: Path | None, theta_rank: int | None,
            gamma: float, theta_budget: str | None, byte_budget: str | None, theta_weights: int | None,
            tensor_types: tuple[tuple[str, str], ...], selective_layers: tuple[str, ...],
            calib_text: Path | None, calib_tokens: int | None, calib_memory: str | None, max_memory: str | None,
            save_imatrix: Path | None, theta_calib: str,
            theta_fit: str, theta_damping: float | None, theta_rounds: int, theta_train: str,
            theta_train_steps: int, theta_train_lr: float, theta_train_tokens: int, speed_price: float, imatrix: str, threads: int, so8t: str,
            so8t_seed: int | None, so8t_heads: bool, force: bool, report_dir: Path | None,
            optimize_rank: bool, calibrate_temperature: bool, as_json: bool) -> None:
    """Quantize a GGUF with llama.cpp and store theta (what quantization lost, low rank) in its metadata.

    \b
    Defaults, from the frontier run in BENCHMARKS.md ("This session"), the same as the library's
    ConvertOptions(input, output):
      --outtype IQ4_NL --byte-budget 3% --theta-weights 15
    The byte budget applies unless --theta-rank (one rank on every weight) or --theta-budget is given.
    """
    from nkat_gguf.convert import ConvertOptions
    from nkat_gguf.convert import convert as run_convert
    from nkat_gguf.default_model import resolve_model
    from nkat_gguf.so8t import So8tOptions

    if optimize_rank and calibrate_temperature:
        raise click.UsageError("--calibrate-temperature does not combine with --optimize-rank: run "
                               "'nkat-gguf qc confidence BEST.gguf --write-temperature OUT' on the result")
    given = {"outtype": outtype, "theta_rank": theta_rank, "selective_layers": list(selective_layers) or None,
             "calib_memory": calib_memory}  # the rest: ConvertOptions' own defaults, decided there
    opts = ConvertOptions(
        input=resolve_model(input_), output=output, reference=reference, gamma=gamma,
        theta_budget=theta_budget, byte_budget=byte_budget, theta_weights=theta_weights, tensor_types=tensor_types,
        calib_text=calib_text, calib_tokens=calib_tokens, max_memory=max_memory, save_imatrix=save_imatrix,
        theta_calib=theta_calib,
        theta_fit=theta_fit, theta_damping=theta_damping, theta_rounds=theta_rounds, imatrix=imatrix, threads=threads,
        so8t=So8tOptions(mode=so8t, seed=so8t_seed, heads=so8t_heads, force=force, report_dir=report_dir),
        calibrate_temperature=calibrate_temperature, progress=progress_wanted(as_json),
        theta_train=theta_train, theta_train_steps=theta_train_steps, theta_train_lr=theta_train_lr,
        theta_train_tokens=theta_train_tokens, speed_price=speed_price,
        **{k: v for k, v in given.items() if v is not None})
    if optimize_rank:
        from nkat_gguf.optimizer.outputs import format_summary
        from nkat_gguf.optimizer.study import optimize_convert

        emit(optimize_convert(opts), as_json, format_summary)
        return
    emit(run_convert(opts).as_dict(), as_json, format_convert)


def format_convert(r: dict) -> str:
    mib = 1 << 20
    energy = [t["captured_energy"] for t in r["tensors"].values() if t["captured_energy"] is not None]
    mean_energy = f"{100 * sum(energy) / len(energy):.1f} %" if energy else "n/a"  # n/a too once θ is trained
    lines = [f"wrote {r['output']} ({r['output_bytes'] / mib:.2f} MiB, {r['outtype']}, theta rank {r['theta_rank']} "
             f"on {len(r['tensors'])} weights, {r['theta_metadata_bytes'] / mib:.2f} MiB of theta metadata)",
             f"calibration: {r['calibration']}, importance matrix: {r['imatrix']}, "
             f"mean residual energy captured: {mean_energy}",
             "time: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items())]
    if (allocation := r.get("allocation")) and allocation["method"] == "mix":
        upgrades = ", ".join(f"{n}× {k}" for k, n in allocation["upgrades"].items())
        lines.append(f"allocation: {allocation['spent_bytes'] / mib:.2f} of {allocation['budget_bytes'] / mib:.2f} MiB; "
                     f"theta on {allocation['weights']} weights (total rank {allocation['total_rank']}), "
                     f"types: {upgrades or 'none upgraded'}")
    elif allocation:
        kinds = ", ".join(f"{k} {v['weights']}×Σr{v['total_rank']}" for k, v in allocation["ranks_by_kind"].items())
        lines.append(f"allocation: {allocation['spent_bytes'] / mib:.2f} of {allocation['budget_bytes'] / mib:.2f} MiB "
                     f"on {allocation['weights']} weights ({kinds or 'none'})")
    if train := r.get("theta_train"):
        resumed = train["resumed_blocks"]
        lines.append(f"theta trained ({train['mode']}, {train['device']}, {train['seconds']:.1f} s): loss "
                     f"{train['initial_loss']:.4g} -> {train['final_loss']:.4g}"
                     + (f", {resumed} blocks resumed from a checkpoint" if resumed else ""))
    if r.get("temperature"):
        lines.append(f"fitted temperature {r['temperature']['temperature']:.4f} (NLL on "
                     f"{r['temperature']['tokens']} calibration tokens), stored as nkat.confidence.temperature")
    if r.get("so8t"):
        lines.append(f"SO8T {r['so8t']['description']}: {format_qc(r['so8t']['qc'])}"
                     + (", written anyway (--force)" if r["so8t"]["forced"] else ""))
    return "\n".join(lines + [f"note: {n}" for n in r["notes"]])
