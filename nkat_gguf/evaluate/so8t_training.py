"""`so8t train --report-dir D`: the phase-transition report of a training run, and the final perplexities.

Files: so8t-train.json (everything), so8t-train.md (tables), sigma.png (σ(α) per gate and step),
loss.png (train and eval loss), blocks.png (max ‖RᵀR − I‖_F and min det over training).

Final perplexities (llama.cpp, llama-perplexity's method, `chunks` chunks of 512 of each text), every
file written by `convert` with θ off (rank 0), so the rows differ only in the rotation:
  reference           the input as F32 (what both objectives aim at)
  base quantized      convert --outtype T                    (importance matrix: auto, as convert's default)
  trained quantized   convert --outtype T --so8t file:gates  (QC of the bake recorded)
  trained F32         convert --outtype F32 --so8t file:gates (lm only: the quant objective's rotation
                      is function-preserving, so its F32 bake is the reference; QC shows that)
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.format.atomic import atomic_output, make_output_dir
from nkat_gguf.so8t import So8tOptions
from nkat_gguf.so8t.train import OPEN_LEVEL, TrainOptions, TrainResult
from nkat_gguf.texts import Split, load_text

REPORT_NAME = "so8t-train"
REPORT_TEXTS: tuple[Split, ...] = ("evaluation", "licenses")


def final_perplexities(opts: TrainOptions, chunks: int, threads: int | None, work_dir: Path,
                       progress: bool = True) -> dict[str, Any]:
    """Convert the rows of the module docstring and score each on both evaluation texts."""
    gates = f"file:{Path(opts.output).resolve()}"
    rows = [("reference (F32)", "F32", "none"), (f"base {opts.outtype}", opts.outtype, "none"),
            (f"trained {opts.outtype}", opts.outtype, gates)]
    if opts.objective == "lm":
        rows.append(("trained F32", "F32", gates))
    imatrix = "auto" if opts.imatrix else "none"
    texts = {split: load_text(opts.eval_text if split == "evaluation" else None, split) for split in REPORT_TEXTS}
    out: dict[str, Any] = {"chunks": chunks, "n_ctx": 512, "texts": {k: t.source for k, t in texts.items()},
                           "rows": {}}
    with tempfile.TemporaryDirectory(prefix=".so8t-report-", dir=work_dir) as tmp:
        for label, outtype, so8t in tqdm(rows, desc="final perplexities", unit="model", disable=not progress):
            path = Path(tmp) / f"{len(out['rows'])}.gguf"
            report = convert(ConvertOptions(input=Path(opts.model), output=path, outtype=outtype, theta_rank=0,
                                            imatrix=imatrix if outtype != "F32" else "none", so8t=So8tOptions(mode=so8t),
                                            threads=threads or 0, progress=False))
            row: dict[str, Any] = {"outtype": outtype, "so8t": so8t, "bytes": report.output_bytes,
                                   "convert_seconds": report.seconds.get("total")}
            if report.so8t is not None:
                row["qc"] = report.so8t["qc"]
            with NkatRuntime(path, RuntimeOptions(n_ctx=512, n_batch=512, n_threads=threads)) as runtime:
                runtime.set_gamma(None)
                for split, text in texts.items():
                    result = perplexity(runtime.llm, tokenize_text(runtime.llm, text.content), 512, chunks,
                                        progress=False)
                    row[split] = {"ppl": result.ppl, "ppl_stderr": result.ppl_stderr,
                                  "tokens_scored": result.tokens_scored}
            out["rows"][label] = row
            path.unlink()
    return out


def write_report(directory: Path, result: TrainResult, final: Mapping[str, Any] | None) -> list[Path]:
    """JSON, Markdown and the three PNG plots into `directory` (created if missing), each atomically."""
    directory = make_output_dir(Path(directory))
    report = {"training": result.as_dict(), "final": final, "open_level": OPEN_LEVEL}
    written = []
    for suffix, content in (("json", json.dumps(report, indent=2, default=str) + "\n"),
                            ("md", _markdown(result, final))):
        path = directory / f"{REPORT_NAME}.{suffix}"
        with atomic_output(path) as tmp:
            tmp.write_text(content, encoding="utf-8")
        written.append(path)
    return written + _plots(directory, result)


def _markdown(result: TrainResult, final: Mapping[str, Any] | None) -> str:
    o = result.options
    lines = [f"# SO8T training: {Path(result.output).name}", "",
             f"- model `{o['model']}`, objective **{result.objective}**"
             + (f", target {o['outtype']} (importance matrix {'on' if o['imatrix'] else 'off'})"
                if result.objective == "quant" else ""),
             (f"- {result.steps} steps (resumed from {result.resumed_from}), batch {o['batch']}×{o['ctx']} tokens, "
              f"accumulate {o['accumulate']}, Adam lr {o['lr']}, λ_max {o['lambda_max']}, warmup {o['warmup']}"),
             f"- training time {result.seconds:.1f} s ({result.tokens_per_second:.1f} tokens/s)", "",
             (f"A gate *opened* at the first step with σ(α) ≥ {OPEN_LEVEL}; *steepest* is the step of the "
              "largest rise of σ between two steps."), "",
             "| gate | final σ(α) | opened | steepest | max ‖σA_k‖_F | max ‖RᵀR − I‖_F | min det |",
             "|---|---|---|---|---|---|---|"]
    for name, g in result.gates.items():
        fig = result.block_figures[name]
        lines.append(f"| {name} | {g['sigma']:.4g} | {g['opened_step'] if g['opened_step'] is not None else 'closed'}"
                     f" | {g['steepest_step']} | {g['max_generator_norm']:.3g} | "
                     f"{max(fig['orthogonality_error']):.2e} | {min(fig['det']):.9f} |")
    lines += ["", "| step | eval loss |", "|---|---|"]
    lines += [f"| {e['step']} | {e['eval_loss']:.6g} |" for e in result.evals]
    if final:
        texts = list(final["texts"])
        lines += ["", f"Final perplexity (llama.cpp, {final['chunks']} chunks of {final['n_ctx']}, θ off):", "",
                  "| model | " + " | ".join(final["texts"][t] for t in texts) + " | file | QC |",
                  "|---|" + "---|" * len(texts) + "---|---|"]
        for label, row in final["rows"].items():
            qc = row.get("qc")
            verdict = "–" if qc is None else (f"passed (max \\|Δz\\| {qc['max_abs_dz']:.2g}, mean KL "
                                              f"{qc['mean_kl']:.2g})" if qc["passed"] else "FAILED")
            cells = " | ".join(f"{row[t]['ppl']:.4f} ± {row[t]['ppl_stderr']:.4f}" for t in texts)
            lines.append(f"| {label} | {cells} | {row['bytes'] / 2**20:.1f} MiB | {verdict} |")
    return "\n".join(lines) + "\n"


def _plots(directory: Path, result: TrainResult) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in result.history]
    written = []

    def save(fig: Any, name: str) -> None:
        path = directory / name
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in result.gates:
        ax.plot(steps, [h["sigma"][name] for h in result.history], lw=1)
    ax.axhline(OPEN_LEVEL, color="grey", ls="--", lw=0.8, label=f"open at σ = {OPEN_LEVEL}")
    ax.set(xlabel="step", ylabel="σ(α)", yscale="log", title=f"alpha gates ({len(result.gates)})")
    ax.legend()
    save(fig, "sigma.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in result.history], label="train")
    ax.plot([e["step"] for e in result.evals], [e["eval_loss"] for e in result.evals], "o-", label="eval")
    ax.set(xlabel="step", ylabel="KL(ref ‖ quantized)" if result.objective == "quant" else "cross-entropy",
           title="loss")
    ax.legend()
    save(fig, "loss.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(steps, [max(h["max_orthogonality_error"].values()) for h in result.history])
    a1.set(xlabel="step", ylabel="max ‖RᵀR − I‖_F", yscale="log", title="orthogonality (all blocks)")
    a2.plot(steps, [min(h["min_det"].values()) - 1 for h in result.history])
    a2.set(xlabel="step", ylabel="min det R − 1", title="determinant (all blocks)")
    save(fig, "blocks.png")
    return written

