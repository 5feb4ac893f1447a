"""What `qc confidence` and `qc longtext` cost next to `nkat-gguf perplexity` on the same chunks, as JSON.

In-process, interleaved (perplexity, calibration, perplexity, ...) on one loaded model with theta at its
γ, so machine drift hits both alike:
  per_configuration_ratio = seconds of evaluate.confidence.measure_llm (the temperature fit on
  --calib-chunks calibration chunks + the evaluation chunks scored at T = 1 and at T) over seconds of
  engine.perplexity.perplexity on the same evaluation chunks. Target (issue 11): <= 1.5.
Whole commands, as subprocesses in alternation: `nkat-gguf qc confidence` (every configuration: theta on,
theta off, reference) against `nkat-gguf perplexity` on the same chunks, and `nkat-gguf qc longtext` at
--tokens wall seconds (target: under 60 s on 2 cores).

    .venv/bin/python benchmarks/qc_cost.py --model /tmp/smollm2-q4_0-r8.nkat.gguf --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.evaluate.confidence import CalibrationSettings, measure_llm
from nkat_gguf.texts import load_text


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="An NKAT GGUF (theta at its γ is timed).")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--calib-chunks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--command-rounds", type=int, default=1, help="Rounds of the whole-command timings (0: none).")
    parser.add_argument("--tokens", type=int, default=2048, help="qc longtext window.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    settings = CalibrationSettings(n_chunks=args.chunks, calib_chunks=args.calib_chunks, progress=False)
    eval_text, calib_text = load_text(None, "evaluation"), load_text(None, "calibration")
    rounds = []
    with NkatRuntime(args.model, RuntimeOptions(n_ctx=512, n_batch=512, n_threads=args.threads)) as runtime:
        tokens = tokenize_text(runtime.llm, eval_text.content)
        perplexity(runtime.llm, tokens, 512, 1, progress=False)  # warm-up
        for _ in range(args.rounds):
            bare = perplexity(runtime.llm, tokens, 512, args.chunks, progress=False)
            start = time.perf_counter()
            measured = measure_llm(runtime.llm, tokens, calib_text, settings, runtime.gamma)
            seconds = time.perf_counter() - start
            rounds.append({"perplexity_seconds": bare.seconds, "calibration_seconds": seconds,
                           "ratio": seconds / bare.seconds, "same_ppl": bare.ppl == measured["perplexity"]["ppl"],
                           "load_average_1min": os.getloadavg()[0]})

    cli = [sys.executable, "-m", "nkat_gguf.cli"]
    common = ["--threads", str(args.threads)]
    commands = []
    for _ in range(args.command_rounds):
        ppl = wall([*cli, "perplexity", "-m", args.model, "--chunks", str(args.chunks), *common])
        cal = wall([*cli, "qc", "confidence", args.model, "--chunks", str(args.chunks),
                    "--calib-chunks", str(args.calib_chunks), *common])
        longtext = wall([*cli, "qc", "longtext", args.model, "--tokens", str(args.tokens), *common])
        commands.append({"perplexity_command_seconds": ppl, "qc_calibration_command_seconds": cal,
                         "command_ratio": cal / ppl, "qc_longtext_command_seconds": longtext,
                         "load_average_1min": os.getloadavg()[0]})
    print(json.dumps({
        "model": args.model, "chunks": args.chunks, "calib_chunks": args.calib_chunks, "threads": args.threads,
        "tokens": args.tokens,
        "per_configuration_ratio_median": statistics.median(r["ratio"] for r in rounds),
        "command_ratio_median": statistics.median(c["command_ratio"] for c in commands) if commands else None,
        "qc_longtext_seconds_median": statistics.median(c["qc_longtext_command_seconds"] for c in commands)
        if commands else None,
        "rounds": rounds, "commands": commands,
    }, indent=2))


if __name__ == "__main__":
    main()
