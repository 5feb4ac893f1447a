"""Calibration inside llama.cpp's graph (issue 10): agreement, cost, memory and quality, printed as JSON.

    .venv/bin/python benchmarks/calibration.py --part all [--threads 2] [--rounds 2] > calibration.json

Parts (each a key of the JSON):
- reference: on the default model, E[x²] from llama.cpp's graph vs the PyTorch forward over the same
  windows; relative L2 error per weight (max, median). llama.cpp multiplies the Q4_1 weights with Q8
  activations, the reference in F32, so they differ by that rounding only.
- time: interleaved rounds, one process, the same windows of the same file: a plain llama.cpp forward (no
  callback), the calibration callback path with Σxxᵀ, the default `convert` (its calibration not cached) and
  `llama_model_quantize` with the same importance matrix; targets: forward / calibration throughput >= 0.7,
  convert / (quantize + forward) <= 1.5 (issue 20).
- memory: peak RSS of a process that collects the statistics over few and over many windows (target:
  no growth with the number of tokens).
- quality: Q4_0 of the default model with the importance matrix from this path (llama.cpp, default
  tokens) vs today's (PyTorch forward, 8 sequences of 256 tokens), perplexity over 8 chunks of 512
  on both evaluation texts, and the share of the plain-Q4_0 -> Q4_1 gap each recovers.
- outer: the Σxxᵀ of one window (512 rows) by BLAS in float32 (what the callback does) vs float64, for
  the default model's two input widths, interleaved.
- model (`--model PATH`, any architecture llama.cpp loads): Q4_0 plain, with the importance matrix, with
  importance matrix + activation θ (convert's default method, `--theta-rank`), and with plain-SVD θ and no
  importance matrix (what convert did for architectures without a PyTorch forward); share of the gap
  between plain Q4_0 and the input on both texts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_gguf.convert import ConvertOptions, convert  # noqa: E402
from nkat_gguf.convert.calibrate import (  # noqa: E402
    calibrate,
    calibrate_with_forward,
    calibration_windows,
    recorded_weights,
)
from nkat_gguf.convert.options import DEFAULT_OUTTYPE  # noqa: E402
from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.calibrate.calibration import collect_statistics, plain_forward_seconds  # noqa: E402
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text  # noqa: E402
from nkat_gguf.engine.llama.quantize import quantize_model, resolve_outtype  # noqa: E402
from nkat_gguf.engine.forward.llama import LlamaForward  # noqa: E402
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions  # noqa: E402
from nkat_gguf.engine.llama.vocab import tokenize  # noqa: E402
from nkat_gguf.format.gguf_file import read_layout  # noqa: E402
from nkat_gguf.format.tensors import TensorSource  # noqa: E402
from nkat_gguf.texts import load_text  # noqa: E402

MODEL = default_model_path()
CALIBRATION = load_text(None, "calibration")


def part_reference(tokens: int, threads: int) -> dict:
    ours = calibrate(MODEL, CALIBRATION, tokens, threads=threads, progress=False, cache=False)
    source = TensorSource(MODEL)
    theirs = calibrate_with_forward(source, source.dequantize, MODEL, CALIBRATION, tokens, progress=False)
    errors = {n: float(np.linalg.norm(ours.mean_squares[n] - v) / np.linalg.norm(v))
              for n, v in theirs.mean_squares.items()}
    worst = max(errors, key=errors.get)
    return {"tokens": ours.tokens, "weights": len(errors), "same_weights": ours.mean_squares.keys() == errors.keys(),
            "relative_l2_error_max": errors[worst], "worst_weight": worst,
            "relative_l2_error_median": float(np.median(list(errors.values())))}


def part_time(rounds: int, threads: int, n_windows: int | None) -> dict:
    """Interleaved rounds on the same windows of the same file: (a) a plain llama.cpp forward (no callback),
    (b) the calibration callback path with Σxxᵀ (what the default convert collects), (c) the default convert
    (fresh cache, so it calibrates), (d) quantize with that importance matrix. Targets: forward / calibration
    throughput >= 0.7, convert / (quantize + forward) <= 1.5."""
    layout = read_layout(MODEL)
    windows = calibration_windows(MODEL, CALIBRATION, None if n_windows is None else n_windows * 512)
    tokens = len(windows) * len(windows[0])
    ftype = resolve_outtype(DEFAULT_OUTTYPE, layout)[1]  # convert's own type: "same" (Q4_1) only copies the data
    weights = recorded_weights(MODEL)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for r in range(rounds):
            forward_seconds = plain_forward_seconds(MODEL, windows, threads)
            t = time.perf_counter()
            collect_statistics(MODEL, windows, weights, True, threads, progress=False)
            calibration_seconds = time.perf_counter() - t
            os.environ["NKAT_CACHE_DIR"] = str(work / f"cache-{r}")  # a fresh cache: the convert calibrates
            report = convert(ConvertOptions(input=MODEL, output=work / "out.gguf", calib_tokens=tokens,
                                            threads=threads, progress=False))
            imatrix = calibrate(MODEL, CALIBRATION, tokens, threads=threads, progress=False).mean_squares  # cached
            t = time.perf_counter()
            quantize_model(MODEL, work / "plain.gguf", ftype, imatrix, threads)
            quantize_seconds = time.perf_counter() - t
            rows.append({"plain_forward_seconds": round(forward_seconds, 3),
                         "calibration_seconds": round(calibration_seconds, 3),
                         "calibration_throughput_ratio": round(forward_seconds / calibration_seconds, 3),
                         "convert_seconds": report.seconds, "quantize_seconds": round(quantize_seconds, 3),
                         "ratio_convert_to_quantize_plus_forward":
                             round(report.seconds["total"] / (quantize_seconds + forward_seconds), 3),
                         "load_average_1min": os.getloadavg()[0]})
    return {"calibration_tokens": tokens, "threads": threads, "rounds": rows,
            "best_calibration_throughput_ratio": max(r["calibration_throughput_ratio"] for r in rows),
            "target_calibration_throughput_ratio": 0.7,
            "best_ratio_convert_to_quantize_plus_forward": min(r["ratio_convert_to_quantize_plus_forward"]
                                                               for r in rows),
            "target_ratio_convert_to_quantize_plus_forward": 1.5}


_CHILD = """
import resource, sys
sys.path.insert(0, {root!r})
from nkat_gguf.engine.calibrate.calibration import collect_statistics
from nkat_gguf.convert.calibrate import calibration_windows, recorded_weights
from nkat_gguf.default_model import default_model_path
from nkat_gguf.texts import load_text
m = default_model_path()
w = calibration_windows(m, load_text(None, "calibration"), {tokens})
collect_statistics(m, w, recorded_weights(m), {outer}, {threads}, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def part_memory(threads: int, few: int, many: int) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    result = {}
    for outer in (False, True):
        for tokens in (few, many):
            code = _CHILD.format(root=root, tokens=tokens, outer=outer, threads=threads)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            result[f"{'with' if outer else 'without'}_second_moments_{tokens}_tokens_peak_rss_mib"] = \
                round(int(out.split()[-1]) / 1024, 1)
    return result


def part_quality(threads: int, chunks: int) -> dict:
    layout = read_layout(MODEL)
    ftype = resolve_outtype("Q4_0", layout)[1]
    source = TensorSource(MODEL)
    old_tokens = tokenize(MODEL, CALIBRATION.content)[:8 * 256]  # today's calibration: 8 sequences of 256
    old = LlamaForward(source).input_mean_squares([old_tokens[i * 256:(i + 1) * 256] for i in range(8)])
    new = calibrate(MODEL, CALIBRATION, threads=threads, progress=False)
    result: dict = {"new_tokens": new.tokens, "old_tokens": len(old_tokens), "chunks": chunks}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"Q4_1": MODEL}
        for name, imatrix in (("Q4_0", None), ("Q4_0+imatrix_today", old), ("Q4_0+imatrix_llama_cpp", new.mean_squares)):
            files[name] = Path(tmp) / f"{name}.gguf"
            quantize_model(MODEL, files[name], ftype, imatrix, threads)
        for split in ("evaluation", "licenses"):
            ppl = {}
            for name, path in files.items():
                runtime = NkatRuntime(path, RuntimeOptions(n_threads=threads))
                tokens = tokenize_text(runtime.llm, load_text(None, split).content)
                ppl[name] = perplexity(runtime.llm, tokens, 512, chunks, progress=False).ppl
                runtime.llm.close()
            gap = ppl["Q4_0"] - ppl["Q4_1"]
            result[split] = {"perplexity": ppl, "gap_share_today": (ppl["Q4_0"] - ppl["Q4_0+imatrix_today"]) / gap,
                             "gap_share_llama_cpp": (ppl["Q4_0"] - ppl["Q4_0+imatrix_llama_cpp"]) / gap}
    return result


def part_outer(repetitions: int = 20) -> dict:
    rng = np.random.default_rng(0)
    result = {}
    for width in (576, 1536):
        x32 = rng.standard_normal((512, width), dtype=np.float32)
        x64 = x32.astype(np.float64)
        times: dict[str, list[float]] = {"float32": [], "float64": []}
        for _ in range(repetitions):
            for name, x in (("float32", x32), ("float64", x64)):
                t = time.perf_counter()
                x.T @ x
                times[name].append(time.perf_counter() - t)
        best = {k: min(v) for k, v in times.items()}
        result[f"width_{width}"] = {"float32_ms": round(1e3 * best["float32"], 3),
                                    "float64_ms": round(1e3 * best["float64"], 3),
                                    "float64_over_float32": round(best["float64"] / best["float32"], 2)}
    return result


def _perplexities(files: dict[str, Path], threads: int, chunks: int) -> dict:
    result = {}
    for split in ("evaluation", "licenses"):
        ppl = {}
        for name, path in files.items():
            runtime = NkatRuntime(path, RuntimeOptions(n_threads=threads))
            ppl[name] = perplexity(runtime.llm, tokenize_text(runtime.llm, load_text(None, split).content), 512,
                                   chunks, progress=False).ppl
            runtime.llm.close()
        result[split] = ppl
    return result


def part_model(model: Path, threads: int, chunks: int, calib_tokens: int | None, rank: int) -> dict:
    """Q4_0 variants of any model llama.cpp loads; the input is the reference (share 100 %)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {"Q4_0": dict(imatrix="none", theta_rank=0),
                    "Q4_0+imatrix": dict(imatrix="auto", theta_rank=0),
                    f"Q4_0+imatrix+theta_r{rank}_activation": dict(imatrix="auto", theta_rank=rank),
                    f"Q4_0+theta_r{rank}_plain_svd": dict(imatrix="none", theta_rank=rank, theta_calib="none")}
        files, seconds = {"input": model}, {}
        for name, options in variants.items():
            files[name] = work / f"{name}.gguf"
            report = convert(ConvertOptions(input=model, output=files[name], outtype="Q4_0", calib_tokens=calib_tokens,
                                            threads=threads, progress=False, **options))
            seconds[name] = report.seconds
        ppl = _perplexities(files, threads, chunks)
    shares = {split: {name: (p["Q4_0"] - v) / (p["Q4_0"] - p["input"]) for name, v in p.items()}
              for split, p in ppl.items()}
    return {"model": model.name, "architecture": read_layout(model).architecture, "chunks": chunks,
            "calib_tokens": calib_tokens, "perplexity": ppl, "gap_share": shares, "convert_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["reference", "time", "memory", "quality", "model", "outer", "all"], default="all")
    parser.add_argument("--model", type=Path, help="the model of the 'model' part")
    parser.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens of the 'model' part")
    parser.add_argument("--theta-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--windows", type=int, default=None,
                        help="windows of 512 of the 'time' part (default: convert's default calibration)")
    parser.add_argument("--reference-tokens", type=int, default=4096)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--memory-tokens", type=int, default=16384, help="the larger run of the memory part")
    args = parser.parse_args()
    parts = ["reference", "time", "memory", "quality"] if args.part == "all" else [args.part]
    out: dict = {"default_model": MODEL.name}
    for part in parts:
        if part == "reference":
            out[part] = part_reference(args.reference_tokens, args.threads)
        elif part == "time":
            out[part] = part_time(args.rounds, args.threads, args.windows)
        elif part == "outer":
            out[part] = part_outer()
        elif part == "model":
            out[part] = part_model(args.model, args.threads, args.chunks, args.calib_tokens, args.theta_rank)
        elif part == "memory":
            out[part] = part_memory(args.threads, 1024, args.memory_tokens)
        else:
            out[part] = part_quality(args.threads, args.chunks)
        print(f"{part} done", file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
