"""Cross-check engine.perplexity and engine.bench against stock llama-perplexity and llama-bench.

Builds both tools once from the llama.cpp vendored in the llama-cpp-python 0.3.36 sdist (the same
llama.cpp the product runs), into a cache directory reused afterwards, then measures both sides on
the default model and the built-in evaluation text and prints JSON. Targets: perplexity within
0.5 %, our throughput at least 0.9 x stock. A benchmark only: the product never uses these binaries.

    .venv/bin/python benchmarks/stock_llama_cpp.py --chunks 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import llama_cpp

from nkat_gguf.default_model import resolve_model
from nkat_gguf.engine.measure import bench
from nkat_gguf.engine.perplexity import perplexity, tokenize_text
from nkat_gguf.texts import builtin_text

VERSION = "0.3.36"
TOOLS = ("llama-perplexity", "llama-bench")
DEFAULT_CACHE = Path.home() / ".cache" / "nkat-gguf" / "stock-llama.cpp"
N_CTX = 512
STAMP = r"(\d+)\.(\d{2})\.(\d{3})\.(\d{3})"  # llama.cpp log timestamp: minutes.seconds.ms.us


def _log_seconds(match: re.Match[str]) -> float:
    minutes, seconds, ms, us = (int(match[i]) for i in range(1, 5))
    return 60 * minutes + seconds + ms / 1e3 + us / 1e6


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def _vendored_llama_cpp(cache: Path) -> Path:
    """llama.cpp source from the sdist, downloaded and unpacked into the cache on first use."""
    unpacked = cache / f"llama_cpp_python-{VERSION}"
    if not unpacked.is_dir():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={VERSION}", "-d", str(cache / "sdist")], stdout=sys.stderr)
        with tarfile.open(cache / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            tar.extractall(cache, filter="data")
    return unpacked / "vendor" / "llama.cpp"


def build_tools(cache: Path, source: Path | None) -> Path:
    """bin/ with llama-perplexity and llama-bench, built at lowest CPU priority unless already there.

    ggml's default CPU flags, as llama-cpp-python's own build uses (-march=native): other flags give
    other kernels, hence slightly different logits and speed. The report shows both sides' flags.
    """
    bin_dir = cache / "build" / "bin"
    if all((bin_dir / tool).is_file() for tool in TOOLS):
        return bin_dir
    cache.mkdir(parents=True, exist_ok=True)
    src = source or _vendored_llama_cpp(cache)
    nice = ["nice", "-n", "19"]
    _run(nice + ["cmake", "-S", str(src), "-B", str(cache / "build"), "-DCMAKE_BUILD_TYPE=Release",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"], stdout=sys.stderr)
    _run(nice + ["cmake", "--build", str(cache / "build"), "-j2", "--target", *TOOLS], stdout=sys.stderr)
    return bin_dir


def stock_perplexity(
    bin_dir: Path, model: Path, text: str, chunks: int, threads: int, fa: str
) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "evaluation.txt"
        path.write_text(text + "\n", encoding="utf-8")  # llama.cpp drops one trailing newline from -f files
        start = time.perf_counter()
        out = _run([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(path), "-c", str(N_CTX),
                    "--chunks", str(chunks), "-t", str(threads), "-fa", fa, "--log-prefix", "--log-timestamps"],
                   capture_output=True)
        wall = time.perf_counter() - start
    log = out.stdout + out.stderr
    ppl = re.search(rf"{STAMP} I Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    loop = re.search(rf"{STAMP} I perplexity: calculating perplexity", log)
    cpu = re.search(r"system_info: .*?(CPU : .*?)\s*$", log, re.MULTILINE)
    if not ppl or not loop or not cpu:
        raise RuntimeError(f"unexpected llama-perplexity output:\n{log[-2000:]}")
    # the chunk loop only, from its first log line to its last: the same span engine.perplexity times
    seconds = _log_seconds(ppl) - _log_seconds(loop)
    return {
        "ppl": float(ppl[5]),
        "ppl_stderr": float(ppl[6]),
        "seconds": seconds,
        "tokens_per_second": chunks * N_CTX / seconds,
        "wall_seconds": wall,
        "cpu_features": cpu[1],
    }


def stock_bench(bin_dir: Path, model: Path, repetitions: int, threads: int, fa: str) -> dict[str, float]:
    out = _run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", "512", "-n", "128", "-r", str(repetitions),
                "-t", str(threads), "-fa", fa, "-o", "json"], capture_output=True)
    tests = json.loads(out.stdout)
    pp = next(t for t in tests if t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_prompt"] == 0)
    return {"pp_tokens_per_second": pp["avg_ts"], "pp_sd": pp["stddev_ts"],
            "tg_tokens_per_second": tg["avg_ts"], "tg_sd": tg["stddev_ts"]}


def one_round(llm: llama_cpp.Llama, bin_dir: Path, model: Path, text: str, args: argparse.Namespace) -> dict:
    """Stock and ours back to back for each measurement, so load from other processes hits both alike."""
    stock_ppl = stock_perplexity(bin_dir, model, text, args.chunks, args.threads, args.flash_attn)
    ours_ppl = perplexity(llm, tokenize_text(llm, text), n_ctx=N_CTX, n_chunks=args.chunks).as_dict()
    stock_tp = stock_bench(bin_dir, model, args.repetitions, args.threads, args.flash_attn)
    ours_tp = bench(llm, repetitions=args.repetitions).as_dict()
    return {
        "load_average_1min": os.getloadavg()[0],
        "perplexity": {
            "stock": stock_ppl,
            "ours": ours_ppl,
            "relative_difference": abs(ours_ppl["ppl"] - stock_ppl["ppl"]) / stock_ppl["ppl"],
            "throughput_ratio": ours_ppl["tokens_per_second"] / stock_ppl["tokens_per_second"],
        },
        "bench": {
            "stock": stock_tp,
            "ours": ours_tp,
            "pp_ratio": ours_tp["pp_tokens_per_second"] / stock_tp["pp_tokens_per_second"],
            "tg_ratio": ours_tp["tg_tokens_per_second"] / stock_tp["tg_tokens_per_second"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded default model)")
    parser.add_argument("--chunks", type=int, default=8, help="perplexity chunks of 512 tokens")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; ratios are medians over rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flash-attn", choices=("off", "on"), default="off",
                        help="same on both sides; off is llama-cpp-python's default, stock tools default to auto")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--llama-cpp-source", type=Path, default=None,
                        help="an already unpacked vendor/llama.cpp to build from instead of downloading the sdist")
    args = parser.parse_args()

    model = resolve_model(args.model)
    text = builtin_text("evaluation").content
    bin_dir = build_tools(args.cache_dir, args.llama_cpp_source)
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=args.flash_attn == "on", verbose=False)
    rounds = [one_round(llm, bin_dir, model, text, args) for _ in range(args.rounds)]
    ppl = rounds[0]["perplexity"]
    report = {
        "model": str(model),
        "chunks": args.chunks,
        "flash_attn": args.flash_attn,
        "threads": args.threads,
        "stock_cpu_features": ppl["stock"]["cpu_features"],
        "our_cpu_features": llama_cpp.llama_print_system_info().decode().strip(),
        "summary": {
            "stock_ppl": ppl["stock"]["ppl"],
            "our_ppl": ppl["ours"]["ppl"],
            "ppl_relative_difference": ppl["relative_difference"],
            "perplexity_throughput_ratio": statistics.median(r["perplexity"]["throughput_ratio"] for r in rounds),
            "pp_ratio": statistics.median(r["bench"]["pp_ratio"] for r in rounds),
            "tg_ratio": statistics.median(r["bench"]["tg_ratio"] for r in rounds),
        },
        "rounds": rounds,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
