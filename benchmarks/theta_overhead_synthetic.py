"""θ's prompt and generation overhead on a synthetic llama-shaped model of a chosen size, as JSON.

Users run 7B-class models while the default model is 135M parameters, where llama.cpp's fixed cost
per adapted weight (a few extra graph operations each) weighs most. This builds a llama with random
weights at the chosen size (no weights are downloaded; the tokenizer is the default model's), gives
it a random rank-r θ on the weights `convert` adapts by default (the content of θ does not matter
for speed), and measures the plain model and θ interleaved in one process (evaluate.compare). The
model is cached, so only the first run pays for building it.

    .venv/bin/python benchmarks/theta_overhead_synthetic.py --size 1.1b --type q4_0 --rank 8

Timings on a machine shared with other work are noisy; the interleaving makes the ratio, not the
absolute tokens per second, the figure to trust.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType

from nkat_gguf.convert.selection import default_theta_tensors
from nkat_gguf.engine.llama.adapter import adapter_cache_dir
from nkat_gguf.engine.measure.bench import device_name
from nkat_gguf.engine.measure.speed import interleaved_speed, paired_ratio
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.evaluate.compare import CompareSettings
from nkat_gguf.format.gguf_file import read_layout, write_with_metadata
from nkat_gguf.format.nkat import NkatTheta, theta_metadata
from nkat_gguf.math.theta import LowRank, quantize_int8

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from tools.synthetic_model import TINY, TINYLLAMA_1B, LlamaShape, build_llama_gguf  # noqa: E402

SIZES = {
    "tiny": TINY,
    "135m": LlamaShape(d_model=576, n_ff=1536, n_layers=30, n_head=9, n_head_kv=3),  # SmolLM2-135M's shape
    "1.1b": TINYLLAMA_1B,
}
TYPES = {"q4_0": GGMLQuantizationType.Q4_0, "q8_0": GGMLQuantizationType.Q8_0}


def synthetic_model(cache: Path, size: str, weight_type: str) -> tuple[Path, float]:
    """The cached random model (built on first use) and the seconds building it took (0 when cached)."""
    path = cache / f"synthetic-llama-{size}-{weight_type}.gguf"
    if path.exists():
        return path, 0.0
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build_llama_gguf(path, SIZES[size], TYPES[weight_type])
    return path, time.perf_counter() - start


def random_theta(model: Path, rank: int, weights: int | None = None, seed: int = 0) -> NkatTheta:
    """Random rank-r factors, small enough to keep activations finite, on convert's default weights (the first
    `weights` of them: an operation budget; for speed only how many weights carry θ matters, not which)."""
    layout = read_layout(model)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name in default_theta_tensors(layout)[:weights]:
        n_in, n_out = next(t.shape for t in layout.tensors if t.name == name)[:2]
        a = rng.standard_normal((rank, n_in), dtype=np.float32) / np.float32(np.sqrt(n_in))
        b = rng.standard_normal((n_out, rank), dtype=np.float32) * np.float32(0.01)
        tensors[name] = quantize_int8(LowRank(b, a))
    return NkatTheta(1.0, tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="1.1b")
    parser.add_argument("--type", choices=TYPES, default="q4_0", help="weight type of the synthetic model")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--op-budget", type=int, default=None,
                        help="θ on this many weights only, as convert --op-budget (default: all of convert's)")
    parser.add_argument("--repetitions", "-r", type=int, default=3)
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-gen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--cache-dir", type=Path, default=adapter_cache_dir().parent / "synthetic",
                        help="where the synthetic models are kept (default: beside the adapter cache)")
    args = parser.parse_args()

    model, build_seconds = synthetic_model(args.cache_dir, args.size, args.type)
    with_theta = args.cache_dir / f"{model.stem}.theta-r{args.rank}-w{args.op_budget or 'all'}.gguf"
    theta = random_theta(model, args.rank, args.op_budget)
    write_with_metadata(model, with_theta, theta_metadata(theta))
    settings = CompareSettings(repetitions=args.repetitions, n_prompt=args.n_prompt, n_gen=args.n_gen,
                               ratio_pairs=(("theta", "theta_off"),))
    options = RuntimeOptions(n_ctx=max(512, args.n_prompt, args.n_gen), n_batch=512, n_threads=args.threads)
    with NkatRuntime(with_theta, options) as runtime:
        speed = interleaved_speed(runtime, {"theta_off": None, "theta": 1.0}, settings)
    base, adapted = speed["theta_off"], speed["theta"]
    result = {
        "size": args.size, "shape": asdict(SIZES[args.size]),
        "weight_type": args.type.upper(), "theta_rank": args.rank, "theta_weights": len(theta.tensors),
        "model_bytes": model.stat().st_size, "model_with_theta_bytes": with_theta.stat().st_size,
        "build_seconds": round(build_seconds, 1), "device": device_name(), "threads": args.threads,
        "repetitions": args.repetitions, "n_prompt": args.n_prompt, "n_gen": args.n_gen, "speed": speed,
        "overhead_percentage": {
            "pp": 100.0 * (base["pp_tokens_per_second"] / adapted["pp_tokens_per_second"] - 1.0),
            "tg": 100.0 * (base["tg_tokens_per_second"] / adapted["tg_tokens_per_second"] - 1.0)},
        "speed_ratio_interval": {part: paired_ratio(adapted[f"{part}_runs"], base[f"{part}_runs"])
                                 for part in ("pp", "tg")},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
