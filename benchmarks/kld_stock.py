"""Agreement of our KL divergence with stock `llama-perplexity --kl-divergence`, on the same files and text.

Four comparisons of one quantized file against one reference, printed as JSON with relative differences:
  stock base -> stock compare, our base -> our compare (the two pipelines side by side),
  our base -> stock compare, stock base -> our compare (each side reading the other's base file),
plus the two base files themselves (same tokens? largest difference of a stored log-probability).

Needs a llama.cpp build with llama-perplexity (never a dependency of the project), e.g. from the
llama-cpp-python sdist the project pins:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/sdist
    tar xzf /tmp/sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/sdist
    cmake -S /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llama-build -DLLAMA_CURL=OFF \\
          -DCMAKE_BUILD_TYPE=Release
    cmake --build /tmp/llama-build -j2 --target llama-perplexity
Then:
    .venv/bin/python benchmarks/kld_stock.py --stock-bin /tmp/llama-build/bin --model FILE.gguf --chunks 8
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.measure.kld import measure_model
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.format.kld_base import BaseFile
from nkat_gguf.texts import load_text

# stock's summary lines -> our KldSummary fields
_STOCK_LINES = {
    "kld": r"Mean    KLD:\s+(\S+)", "kld_stderr": r"Mean    KLD:\s+\S+ ±\s+(\S+)",
    "kld_max": r"Maximum KLD:\s+(\S+)", "kld_median": r"Median  KLD:\s+(\S+)",
    "kld_99": r"99\.0%   KLD:\s+(\S+)", "kld_95": r"95\.0%   KLD:\s+(\S+)", "kld_90": r"90\.0%   KLD:\s+(\S+)",
    "ppl": r"Mean PPL\(Q\)\s+:\s+(\S+)", "ppl_base": r"Mean PPL\(base\)\s+:\s+(\S+)",
    "p_diff_rms_percent": r"RMS Δp    :\s+(\S+)", "same_top_percent": r"Same top p:\s+(\S+)",
}


def run_stock(binary: Path, args: list[str]) -> str:
    done = subprocess.run([str(binary), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{binary.name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def parse_stock(output: str) -> dict[str, float]:
    found = {key: re.search(pattern, output) for key, pattern in _STOCK_LINES.items()}
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise SystemExit(f"llama-perplexity printed no {', '.join(missing)} (fewer than 100 tokens scored?)")
    return {k: float(m.group(1)) for k, m in found.items()}


def ours(summary: dict) -> dict[str, float]:
    return {"kld": summary["kld"], "kld_stderr": summary["kld_stderr"], "kld_max": summary["kld_max"],
            "kld_median": summary["kld_median"], "kld_99": summary["kld_percentiles"]["99.0"],
            "kld_95": summary["kld_percentiles"]["95.0"], "kld_90": summary["kld_percentiles"]["90.0"],
            "ppl": summary["ppl"], "ppl_base": summary["ppl_base"],
            "p_diff_rms_percent": 100 * summary["p_diff_rms"], "same_top_percent": 100 * summary["same_top"]}


def relative(a: dict[str, float], b: dict[str, float]) -> dict[str, float | None]:
    return {k: (a[k] - b[k]) / abs(b[k]) if b[k] else None for k in a}


def compare_bases(a: Path, b: Path) -> dict:
    with BaseFile(a) as x, BaseFile(b) as y:
        same_header = x.header == y.header
        out = {"same_header": same_header, "same_tokens": same_header and bool(np.array_equal(x.tokens, y.tokens))}
        if same_header:
            out["max_abs_log_prob_difference"] = max(float(np.abs(x.log_probs(c) - y.log_probs(c)).max())
                                                     for c in range(x.header.n_chunk))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stock-bin", type=Path, required=True, help="llama.cpp build dir holding llama-perplexity")
    ap.add_argument("--model", type=Path, required=True, help="the quantized GGUF to judge")
    ap.add_argument("--reference", type=Path, default=None, help="reference GGUF (default: the embedded model)")
    ap.add_argument("--text", type=Path, default=None, help="UTF-8 text (default: the pydoc evaluation split)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=None, help="keep the base files here")
    args = ap.parse_args()
    binary = args.stock_bin / "llama-perplexity"
    reference = args.reference or default_model_path()
    text = load_text(args.text, "evaluation")
    with tempfile.TemporaryDirectory(prefix="nkat-kld-stock-") as tmp:
        work = args.out_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        text_file = work / "text.txt"
        text_file.write_text(text.content, encoding="utf-8")
        stock_base, our_base = work / "stock.kld", work / "ours.kld"
        common = ["-c", str(args.ctx), "-t", str(args.threads)]
        run_stock(binary, ["-m", str(reference), "-f", str(text_file), "--chunks", str(args.chunks),
                           "--kl-divergence-base", str(stock_base), *common])
        stock_on_stock = parse_stock(run_stock(binary, ["-m", str(args.model), "--kl-divergence-base",
                                                        str(stock_base), "--kl-divergence", *common]))
        options = RuntimeOptions(n_ctx=args.ctx, n_batch=args.ctx, n_threads=args.threads)
        measure_model(reference, options, False, None, text, args.ctx, args.chunks, our_base)
        ours_on_ours = ours(measure_model(args.model, options, True, None, None, None, None, our_base, True)["kld"])
        stock_on_ours = parse_stock(run_stock(binary, ["-m", str(args.model), "--kl-divergence-base",
                                                       str(our_base), "--kl-divergence", *common]))
        ours_on_stock = ours(measure_model(args.model, options, True, None, None, None, None, stock_base, True)["kld"])
        result = {
            "model": str(args.model), "reference": str(reference), "text": text.source, "text_sha256": text.sha256,
            "n_ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
            "stock": stock_on_stock, "ours": ours_on_ours,
            "relative_difference_ours_vs_stock": relative(ours_on_ours, stock_on_stock),
            "stock_reading_our_base": stock_on_ours,
            "relative_difference_stock_on_our_base": relative(stock_on_ours, stock_on_stock),
            "ours_reading_stock_base": ours_on_stock,
            "relative_difference_ours_on_stock_base": relative(ours_on_stock, stock_on_stock),
            "base_files": compare_bases(our_base, stock_base),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
