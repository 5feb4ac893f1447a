"""Where the engine lost speed against stock llama.cpp, measured in CPU seconds on one thread.

On a shared machine wall-clock rates say more about the neighbours than about the code; with one thread
the CPU time a run consumes is its work, whatever the load. Stock: `llama-bench -t 1` run with r and
r + n repetitions, the difference in the child's CPU time divided by n (loading and warm-up cancel).
Engine: `DecodeLoop` runs timed with the thread's CPU clock, flash attention on (now the default)
and off (llama-cpp-python's default, which the engine used before issue 14). Alternating rounds.

    .venv/bin/python benchmarks/stock_cpu_time.py --stock-bin /work/src/stock-build/bin --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
from stock_llama_cpp import DEFAULT_CACHE, default_q4_0, stock_tools  # noqa: E402 (a sibling script)

from nkat_gguf.engine.measure.speed import bench as engine_bench
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions

N_PROMPT, N_GEN = 512, 128


def stock_cpu_seconds(bin_dir: Path, model: Path, test: list[str], n: int) -> float:
    """CPU seconds of one llama-bench repetition of `test` on one thread."""
    def child_cpu(repetitions: int) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-t", "1", "-o", "json", *test,
                        "-r", str(repetitions)], check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return (child_cpu(1 + n) - child_cpu(1)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stock-bin", type=Path, default=os.environ.get("NKAT_STOCK_LLAMA_BIN") or None)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: the default model at Q4_0)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=4, help="runs per side and test in a round")
    args = parser.parse_args()
    bin_dir = stock_tools(args.stock_bin, args.cache_dir, None)
    model = args.model or default_q4_0(args.cache_dir)
    engine_bench.time.perf_counter = time.thread_time  # the loops' clock: this thread's CPU time
    runtimes = {fa: NkatRuntime(model, RuntimeOptions(n_ctx=N_PROMPT + N_GEN, n_threads=1, flash_attn=fa))
                for fa in (True, False)}
    loops = {fa: engine_bench.DecodeLoop(rt.llm) for fa, rt in runtimes.items()}
    rng = np.random.default_rng(0)
    for loop in loops.values():
        loop.time_prompt(N_PROMPT, rng)
        loop.time_generation(8, rng)
    rounds = []
    for _ in range(args.rounds):
        n = args.repetitions
        row = {"load_average_1min": os.getloadavg()[0],
               "stock_pp": N_PROMPT / stock_cpu_seconds(bin_dir, model, ["-p", str(N_PROMPT), "-n", "0"], n),
               "stock_tg": N_GEN / stock_cpu_seconds(bin_dir, model, ["-p", "0", "-n", str(N_GEN)], n)}
        for fa, loop in loops.items():
            name = "engine_fa_on" if fa else "engine_fa_off"
            row[name + "_pp"] = N_PROMPT / statistics.median(loop.time_prompt(N_PROMPT, rng) for _ in range(n))
            row[name + "_tg"] = N_GEN / statistics.median(loop.time_generation(N_GEN, rng) for _ in range(n))
        rounds.append(row)
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ratios = {f"{side}_{test}_vs_stock": median[f"{side}_{test}"] / median[f"stock_{test}"]
              for side in ("engine_fa_on", "engine_fa_off") for test in ("pp", "tg")}
    print(json.dumps({"model": str(model), "unit": "tokens per CPU second, one thread", "median": median,
                      "ratios": ratios, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
