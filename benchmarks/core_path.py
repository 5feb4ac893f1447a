"""Core-path benchmark on the embedded default model, every figure measured in this one run.

    .venv/bin/python benchmarks/core_path.py [--rank 8] [--chunks 16] [--repetitions 5] > core_path.json

Prints JSON with:
- convert: seconds of `llama_model_quantize` alone (Q4_1 -> Q4_0) and of the whole convert at theta rank r
  with calibration and importance matrix, and their ratio (target <= 3);
- theta_read: seconds to read theta from the NKAT file's metadata (target <= 0.5 s at rank 8) and,
  for contrast, gguf-py's GGUFReader on the same file;
- speed: pp/tg tokens per second with theta off and on, interleaved in one process, and the ratios
  (targets: tg >= 0.95, pp >= 0.90);
- quality: perplexity of the Q4_1 reference, of Q4_0 (theta off) and Q4_0 + theta on the evaluation split,
  and the share of the gap recovered (target >= 50 % at rank 8);
- perplexity throughput: tokens per second of engine.perplexity.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf import GGUFReader

from nkat_gguf.convert import ConvertOptions, convert  # noqa: E402
from nkat_gguf.default_model import default_model_path  # noqa: E402
from nkat_gguf.engine.llama.quantize import quantize_model, resolve_outtype  # noqa: E402
from nkat_gguf.engine.llama.runtime import RuntimeOptions  # noqa: E402
from nkat_gguf.evaluate.compare import CompareSettings, compare  # noqa: E402
from nkat_gguf.format.gguf_file import read_layout  # noqa: E402
from nkat_gguf.format.nkat import read_theta  # noqa: E402
from nkat_gguf.texts import load_text  # noqa: E402


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--outtype", default="Q4_0")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--skip-gguf-py", action="store_true", help="skip timing gguf-py's reader (slow)")
    args = parser.parse_args()

    model = default_model_path()
    ftype = resolve_outtype(args.outtype, read_layout(model))[1]
    result: dict = {"command": "python benchmarks/core_path.py " + " ".join(sys.argv[1:]), "model": model.name,
                    "rank": args.rank, "outtype": args.outtype}
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.gguf"
        quantize_seconds = best_of(3, lambda: quantize_model(model, plain, ftype))
        nkat = Path(tmp) / "nkat.gguf"
        t = time.perf_counter()
        report = convert(ConvertOptions(input=model, output=nkat, outtype=args.outtype, theta_rank=args.rank,
                                        progress=False))
        convert_seconds = time.perf_counter() - t
        result["convert"] = {"quantize_only_seconds": quantize_seconds, "convert_seconds": convert_seconds,
                             "ratio": convert_seconds / quantize_seconds, "phases": report.seconds,
                             "theta_metadata_bytes": report.theta_metadata_bytes,
                             "file_bytes": {"plain": plain.stat().st_size, "nkat": nkat.stat().st_size}}
        read_seconds = best_of(3, lambda: read_theta(nkat))
        result["theta_read"] = {"nkat_seconds": read_seconds}
        if not args.skip_gguf_py:
            result["theta_read"]["gguf_py_reader_seconds"] = best_of(1, lambda: GGUFReader(str(nkat)))
        settings = CompareSettings(n_chunks=args.chunks, repetitions=args.repetitions, progress=False)
        measured = compare(nkat, load_text(None, "evaluation"), RuntimeOptions(), settings, gamma=None)
        result["speed"] = {"runs": measured["speed"], "ratio": measured["speed_ratio"],
                           "overhead_percentage": measured["overhead_percentage"]}
        result["quality"] = {"perplexity": {k: v["ppl"] for k, v in measured["perplexity"].items()},
                             "gap_recovered": measured["gap_recovered"], "gamma": measured["gamma"],
                             "chunks": measured["chunks"]}
        result["perplexity_throughput_tokens_per_second"] = {
            k: v["tokens_per_second"] for k, v in measured["perplexity"].items()}
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
