"""Reports of `qc confidence` and `qc longtext`: terminal text, JSON, Markdown and PNG plots.

Every file is written atomically into the report directory:
  calibration.json, calibration.md, reliability.png (confidence vs accuracy per bin, all configurations)
  longtext.json, longtext.md, entropy.png, max_logit.png (per position, all configurations overlaid)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nkat_gguf.format.atomic import atomic_output, make_output_dir

LABELS = {"reference": "reference", "theta": "NKAT, theta on", "theta_off": "NKAT, theta off", "model": "model"}
COLORS = {"reference": "black", "theta": "tab:blue", "theta_off": "tab:orange", "model": "tab:blue"}


def _label(name: str, config: Mapping[str, Any]) -> str:
    gamma = config.get("gamma")
    return LABELS.get(name, name) + (f" (γ {gamma:g})" if gamma is not None else "")


def _write_text(path: Path, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _write_png(path: Path, draw: Callable[[Any], None], rows: int = 1, height: float = 4.5) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=(10, height * rows), squeeze=False)
    try:
        draw(axes[:, 0])
        fig.tight_layout()
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


# ---- calibration ----------------------------------------------------------------------------------


def format_calibration(report: Mapping[str, Any]) -> str:
    """One row per configuration: ECE, Brier, NLL, top-1, confidence at T = 1 and at the fitted T."""
    lines = [f"model  {report['model']}",
             f"text   {report['text']} ({report['chunks']} chunks of {report['n_ctx']}); T fitted on "
             f"{report['calibration_text']} ({report['calibration_chunks']} chunks); ECE over "
             f"{report['ece_bins']} {report['ece_binning']} bins",
             f"{'':26}{'T':>7}{'ECE':>9}{'ECE@T':>9}{'Brier':>9}{'Brier@T':>9}{'NLL':>9}{'NLL@T':>9}"
             f"{'top-1':>8}{'conf':>8}{'conf@T':>8}"]
    for name, c in report["configurations"].items():
        b, a = c["before"], c["after"]
        lines.append(f"{_label(name, c):26}{c['temperature']:>7.3f}{b['ece']:>9.4f}{a['ece']:>9.4f}"
                     f"{b['brier']:>9.4f}{a['brier']:>9.4f}{b['nll']:>9.4f}{a['nll']:>9.4f}"
                     f"{b['top1_accuracy']:>8.4f}{b['mean_confidence']:>8.4f}{a['mean_confidence']:>8.4f}")
    if report["reference"] is None:
        lines.append("no reference measured (pass --reference REF.gguf)")
    for name, c in report["configurations"].items():
        if c.get("temperature_at_bound"):
            lines.append(f"note: {_label(name, c)}: T is at the bound of the search range, not an interior minimum")
    if report.get("wrote_temperature"):
        lines.append(f"wrote {report['wrote_temperature']} with nkat.confidence.temperature = "
                     f"{report['configurations'][report['main']]['temperature']:.4f}")
    return "\n".join(lines)


def calibration_markdown(report: Mapping[str, Any]) -> str:
    rows = ["| configuration | T | ECE | ECE at T | Brier | Brier at T | NLL | NLL at T | top-1 | confidence "
            "| confidence at T | perplexity |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in report["configurations"].items():
        b, a = c["before"], c["after"]
        rows.append(f"| {_label(name, c)} | {c['temperature']:.4f} | {b['ece']:.4f} | {a['ece']:.4f} | "
                    f"{b['brier']:.4f} | {a['brier']:.4f} | {b['nll']:.4f} | {a['nll']:.4f} | "
                    f"{b['top1_accuracy']:.4f} | {b['mean_confidence']:.4f} | {a['mean_confidence']:.4f} | "
                    f"{c['perplexity']['ppl']:.4f} |")
    return "\n".join([
        f"# Confidence calibration: {Path(report['model']).name}", "",
        f"- evaluation text: {report['text']} ({report['chunks']} chunks of {report['n_ctx']}, llama-perplexity's "
        "scored positions)",
        f"- temperature fitted on: {report['calibration_text']} ({report['calibration_chunks']} chunks), "
        f"minimising NLL over T in [{report['temperature_range'][0]}, {report['temperature_range'][1]}]",
        f"- ECE: {report['ece_bins']} {report['ece_binning']} confidence bins; Brier: multiclass over the full "
        "vocabulary (0 best, 2 worst); definitions in docs/QC.md",
        f"- reference: {report['reference'] or 'none'}", "", *rows, "",
        "![reliability diagram](reliability.png)", ""])


def _draw_reliability(axes: Any, report: Mapping[str, Any]) -> None:
    ax = axes[0]
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, c in report["configurations"].items():
        for key, style, title in (("before", "-", "T = 1"), ("after", ":", f"T = {c['temperature']:.3f}")):
            bins = [b for b in c[key]["bins"] if b["count"]]
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", markersize=4,
                    linestyle=style, color=COLORS.get(name),
                    label=f"{_label(name, c)}, {title}: ECE {c[key]['ece']:.4f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence in bin (max softmax probability)")
    ax.set_ylabel("top-1 accuracy in bin")
    ax.set_title(f"Reliability, {report['ece_bins']} {report['ece_binning']} bins ({report['text']}); "
                 "dotted: at the fitted temperature")
    ax.legend(loc="upper left")


def write_calibration_report(directory: Path, report: Mapping[str, Any]) -> list[Path]:
    directory = make_output_dir(directory)
    return [_write_text(directory / "calibration.json", json.dumps(report, indent=2, default=str) + "\n"),
            _write_text(directory / "calibration.md", calibration_markdown(report)),
            _write_png(directory / "reliability.png", lambda axes: _draw_reliability(axes, report), height=7)]


# ---- long text ------------------------------------------------------------------------------------

_INDEX_COLUMNS = (("oscillation_index", "oscillation", ".3f"), ("entropy_mean", "entropy", ".3f"),
                  ("entropy_drift_per_1k", "drift /1k", "+.3f"), ("entropy_cv", "entropy CV", ".3f"),
                  ("drop_share", "drop share", ".3f"))


def _index_cells(indices: Mapping[str, Any] | None) -> list[str]:
    if indices is None:
        return ["n/a"] * (len(_INDEX_COLUMNS) + 1)
    return [format(indices[key], fmt) for key, _, fmt in _INDEX_COLUMNS] + [str(len(indices["drop_positions"]))]


def format_longtext(report: Mapping[str, Any]) -> str:
    header = "".join(f"{title:>12}" for _, title, _ in _INDEX_COLUMNS) + f"{'drops':>7}"
    lines = [f"model  {report['model']}",
             f"text   {report['text']}: teacher-forced window of {report['window_tokens']} tokens (context "
             f"{report['n_ctx']}); greedy generations of up to {report['gen_tokens']} tokens",
             *[f"note: {n}" for n in report["notes"]], f"{'teacher-forced':52}{header}"]
    for name, c in report["configurations"].items():
        lines.append(f"{_label(name, c):52}" + "".join(f"{v:>12}" for v in _index_cells(c["teacher_forced"])[:-1])
                     + f"{_index_cells(c['teacher_forced'])[-1]:>7}")
    lines.append(f"{'generation':52}{header}{'tokens':>8}{'repeat':>8}  stop")
    for name, c in report["configurations"].items():
        for prompt, g in c["generation"].items():
            cells = _index_cells(g["indices"])
            lines.append(f"{_label(name, c) + ' / ' + prompt:52}" + "".join(f"{v:>12}" for v in cells[:-1])
                         + f"{cells[-1]:>7}{g['tokens']:>8}{g['repetition_share']:>8.3f}  {g['stop']}")
    if report["reference"] is None:
        lines.append("no reference measured (pass --reference REF.gguf)")
    return "\n".join(lines)


def longtext_markdown(report: Mapping[str, Any]) -> str:
    head = "| " + " | ".join(t for _, t, _ in _INDEX_COLUMNS) + " | drops |"
    rule = "|---" * (len(_INDEX_COLUMNS) + 2) + "|"
    tf = [f"| configuration {head}", rule]
    for name, c in report["configurations"].items():
        tf.append(f"| {_label(name, c)} | " + " | ".join(_index_cells(c["teacher_forced"])) + " |")
    gen = [f"| configuration / prompt {head} tokens | repetition share | stop |", rule + "---|---|---|"]
    for name, c in report["configurations"].items():
        for prompt, g in c["generation"].items():
            gen.append(f"| {_label(name, c)} / {prompt} | " + " | ".join(_index_cells(g["indices"]))
                       + f" | {g['tokens']} | {g['repetition_share']:.3f} | {g['stop']} |")
    return "\n".join([
        f"# Long-text regression: {Path(report['model']).name}", "",
        f"- teacher-forced: the first {report['window_tokens']} tokens of {report['text']} "
        f"(--tokens {report['tokens_requested']}, context {report['n_ctx']})",
        f"- generation: greedy, up to {report['gen_tokens']} tokens per built-in prompt, stopped by an "
        "end-of-generation token",
        *[f"- note: {n}" for n in report["notes"]],
        f"- reference: {report['reference'] or 'none'}; definitions of every index in docs/QC.md", "",
        "## Teacher-forced window", "", *tf, "", "## Greedy generations", "", *gen, "",
        "![entropy](entropy.png)", "", "![max logit](max_logit.png)", ""])


def _draw_series(axes: Any, report: Mapping[str, Any], key: str, ylabel: str) -> None:
    panels = [("teacher_forced", f"teacher-forced window ({report['text']})")]
    panels += [(prompt, f"greedy generation: {prompt}") for prompt in
               next(iter(report["configurations"].values()))["generation"]]
    for ax, (panel, title) in zip(axes, panels):
        for name, c in report["configurations"].items():
            series = (c["teacher_forced"] if panel == "teacher_forced" else c["generation"][panel])["series"][key]
            ax.plot(series, linewidth=0.7, color=COLORS.get(name), label=_label(name, c), alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel("position")
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper right")


def write_longtext_report(directory: Path, report: Mapping[str, Any]) -> list[Path]:
    directory = make_output_dir(directory)
    rows = 1 + len(next(iter(report["configurations"].values()))["generation"])
    return [_write_text(directory / "longtext.json", json.dumps(report, indent=2, default=str) + "\n"),
            _write_text(directory / "longtext.md", longtext_markdown(report)),
            _write_png(directory / "entropy.png",
                       lambda axes: _draw_series(axes, report, "entropy", "entropy of next token (nats)"), rows, 3.2),
            _write_png(directory / "max_logit.png",
                       lambda axes: _draw_series(axes, report, "max_logit", "max logit"), rows, 3.2)]
