"""The engine against stock llama.cpp on the same file and threads: pp512, tg128 and perplexity throughput.

Stock `llama-bench` and `llama-perplexity` are built once, the way llama.cpp builds by default (for the
local CPU), from the llama.cpp vendored in the llama-cpp-python 0.3.36 sdist (the one the product runs);
`--stock-bin DIR` or NKAT_STOCK_LLAMA_BIN points at tools already built so nobody builds twice. Both
sides run as a user would (`nkat-gguf bench --json`, `nkat-gguf perplexity --json`), θ off, in
alternating rounds (stock first, then ours first) so drift hits both; the ratios are medians over rounds.
It refuses to measure on a busy machine (1-minute load average above --max-load) unless --force, which
the JSON records. Targets (issue 14): pp and tg >= 0.95, perplexity throughput >= 0.90.

    .venv/bin/python benchmarks/stock_llama_cpp.py --stock-bin /work/src/stock-build/bin --rounds 3 > stock.json
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
from pathlib import Path

import llama_cpp

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.default_model import default_model_path, resolve_model
from nkat_gguf.engine.llama.runtime import physical_cores
from nkat_gguf.engine.llama.system_info import build_features
from nkat_gguf.texts import builtin_text

VERSION = "0.3.36"
TOOLS = ("llama-perplexity", "llama-bench")
DEFAULT_CACHE = Path.home() / ".cache" / "nkat-gguf" / "stock-llama.cpp"
N_CTX, N_PROMPT, N_GEN = 512, 512, 128
TARGETS = {"pp_ratio": 0.95, "tg_ratio": 0.95, "perplexity_throughput_ratio": 0.90}
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


def stock_tools(stock_bin: Path | None, cache: Path, source: Path | None) -> Path:
    """bin/ with llama-perplexity and llama-bench: the given prebuilt one, else built once into the cache.

    The build is llama.cpp's default (GGML_NATIVE: kernels for this CPU, OpenMP, Release), only without
    the downloader (LLAMA_CURL=OFF); its system info line goes into the report beside ours.
    """
    if stock_bin is not None:
        missing = [tool for tool in TOOLS if not (stock_bin / tool).is_file()]
        if missing:
            sys.exit(f"error: {stock_bin} lacks {', '.join(missing)} (build them with --cache-dir instead)")
        return stock_bin
    bin_dir = cache / "build" / "bin"
    if all((bin_dir / tool).is_file() for tool in TOOLS):
        return bin_dir
    cache.mkdir(parents=True, exist_ok=True)
    src = source or _vendored_llama_cpp(cache)
    nice = ["nice", "-n", "19"]
    _run(nice + ["cmake", "-S", str(src), "-B", str(cache / "build"), "-DLLAMA_CURL=OFF"], stdout=sys.stderr)
    _run(nice + ["cmake", "--build", str(cache / "build"), "-j2", "--target", *TOOLS], stdout=sys.stderr)
    return bin_dir


def default_q4_0(cache: Path) -> Path:
    """The issue's file: the default model converted to Q4_0 without θ (converted once, then reused)."""
    out = cache / "SmolLM2-135M-Instruct.Q4_0.gguf"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        convert(ConvertOptions(input=default_model_path(), output=out, outtype="Q4_0", theta_rank=0,
                               imatrix="none", progress=False))
    return out


def stock_bench(bin_dir: Path, model: Path, repetitions: int, threads: int) -> dict[str, float]:
    out = _run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(N_PROMPT), "-n", str(N_GEN),
                "-r", str(repetitions), "-t", str(threads), "-o", "json"], capture_output=True)
    tests = json.loads(out.stdout)
    pp = next(t for t in tests if t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_prompt"] == 0)
    return {"pp_tokens_per_second": pp["avg_ts"], "pp_sd": pp["stddev_ts"],
            "tg_tokens_per_second": tg["avg_ts"], "tg_sd": tg["stddev_ts"], "flash_attn": pp.get("flash_attn")}


def stock_perplexity(bin_dir: Path, model: Path, text_file: Path, chunks: int, threads: int) -> dict:
    out = _run([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text_file), "-c", str(N_CTX),
                "--chunks", str(chunks), "-t", str(threads), "--log-prefix", "--log-timestamps"],
               capture_output=True)
    log = out.stdout + out.stderr
    ppl = re.search(rf"{STAMP} I Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    loop = re.search(rf"{STAMP} I perplexity: calculating perplexity", log)
    system = re.search(r"system_info: .*?(CPU : .*?)\s*$", log, re.MULTILINE)
    if not ppl or not loop or not system:
        raise RuntimeError(f"unexpected llama-perplexity output:\n{log[-2000:]}")
    seconds = _log_seconds(ppl) - _log_seconds(loop)  # the chunk loop, the span engine.perplexity times
    return {"ppl": float(ppl[5]), "ppl_stderr": float(ppl[6]), "seconds": seconds,
            "tokens_per_second": chunks * N_CTX / seconds, "system_info": system[1]}


def _nkat(*args: str) -> dict:
    out = _run([sys.executable, "-m", "nkat_gguf.cli", *args, "--json"], capture_output=True)
    return json.loads(out.stdout)


def our_bench(model: Path, repetitions: int, threads: int) -> dict[str, float]:
    result = _nkat("bench", "--model", str(model), "--n-prompt", str(N_PROMPT), "--n-gen", str(N_GEN),
                   "--repetitions", str(repetitions), "--threads", str(threads))
    runs = result["runs"]
    return runs["theta_off"] if "theta_off" in runs else runs["baseline"]  # "baseline": before issue 18


def our_perplexity(model: Path, text_file: Path, chunks: int, threads: int) -> dict:
    return _nkat("perplexity", "--model", str(model), "--no-theta", "--text", str(text_file), "--ctx", str(N_CTX),
                 "--chunks", str(chunks), "--threads", str(threads))


def one_round(order: tuple[str, str], bin_dir: Path, model: Path, text_file: Path, args: argparse.Namespace) -> dict:
    """Both sides of each measurement back to back, in the given order."""
    run = {"stock": {"bench": lambda: stock_bench(bin_dir, model, args.repetitions, args.threads),
                     "perplexity": lambda: stock_perplexity(bin_dir, model, text_file, args.chunks, args.threads)},
           "ours": {"bench": lambda: our_bench(model, args.repetitions, args.threads),
                    "perplexity": lambda: our_perplexity(model, text_file, args.chunks, args.threads)}}
    got: dict[str, dict] = {"stock": {}, "ours": {}}
    for what in ("bench", "perplexity"):
        for side in order:
            got[side][what] = run[side][what]()
    stock, ours = got["stock"], got["ours"]
    return {
        "order": list(order),
        "load_average_1min": os.getloadavg()[0],
        "stock": stock, "ours": ours,
        "pp_ratio": ours["bench"]["pp_tokens_per_second"] / stock["bench"]["pp_tokens_per_second"],
        "tg_ratio": ours["bench"]["tg_tokens_per_second"] / stock["bench"]["tg_tokens_per_second"],
        "perplexity_throughput_ratio": ours["perplexity"]["tokens_per_second"]
        / stock["perplexity"]["tokens_per_second"],
        "ppl_relative_difference": abs(ours["perplexity"]["ppl"] - stock["perplexity"]["ppl"])
        / stock["perplexity"]["ppl"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="GGUF file (default: the embedded model converted to Q4_0, cached)")
    parser.add_argument("--stock-bin", type=Path, default=os.environ.get("NKAT_STOCK_LLAMA_BIN") or None,
                        help="directory with prebuilt llama-bench and llama-perplexity (or NKAT_STOCK_LLAMA_BIN)")
    parser.add_argument("--chunks", type=int, default=8, help="perplexity chunks of 512 tokens")
    parser.add_argument("--repetitions", type=int, default=5, help="llama-bench repetitions per round, both sides")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; ratios are medians over them")
    parser.add_argument("--threads", type=int, default=physical_cores(),
                        help="threads on both sides (default: the physical cores, llama.cpp's default)")
    parser.add_argument("--max-load", type=float, default=0.5 * physical_cores(),
                        help="refuse when the 1-minute load average is above this (default: half the cores)")
    parser.add_argument("--force", action="store_true", help="measure on a busy machine anyway (recorded)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--llama-cpp-source", type=Path, default=None,
                        help="an already unpacked vendor/llama.cpp to build from instead of downloading the sdist")
    args = parser.parse_args()

    load = os.getloadavg()
    if load[0] > args.max_load and not args.force:
        sys.exit(f"error: the machine is busy (1-minute load average {load[0]:.2f} > {args.max_load:.2f}): speed "
                 "ratios measured now would say more about the other processes than about the engine; "
                 "rerun when it is quiet, or pass --force to measure anyway (the JSON records it)")
    bin_dir = stock_tools(args.stock_bin, args.cache_dir, args.llama_cpp_source)
    model = resolve_model(args.model) if args.model else default_q4_0(args.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "evaluation.txt"
        # llama.cpp drops one trailing newline from -f files; nkat-gguf --text reads the file as it is
        text_file.write_text(builtin_text("evaluation").content + "\n", encoding="utf-8")
        rounds = [one_round(("stock", "ours") if i % 2 == 0 else ("ours", "stock"), bin_dir, model, text_file, args)
                  for i in range(args.rounds)]
    ours = build_features(llama_cpp.llama_print_system_info().decode(errors="replace"))
    stock = build_features(rounds[0]["stock"]["perplexity"]["system_info"])
    summary = {}
    for key in (*TARGETS, "ppl_relative_difference"):
        values = [r[key] for r in rounds]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": str(model),
        "stock_bin": str(bin_dir),
        "threads": args.threads, "chunks": args.chunks, "repetitions": args.repetitions, "rounds": args.rounds,
        "forced": bool(args.force and load[0] > args.max_load),
        "load_average_at_start": {"1min": load[0], "5min": load[1], "15min": load[2], "max_load": args.max_load},
        "cpu_features": ours.cpu,
        "llama_cpp": {"ours": ours.as_dict(), "stock": stock.as_dict()},
        "summary": summary,
        "targets": {key: {"target": target, "met": summary[key]["median"] >= target}
                    for key, target in TARGETS.items()},
        "rounds_detail": rounds,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
