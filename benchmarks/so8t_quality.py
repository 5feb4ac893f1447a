"""SO8T baking on the embedded default model: QC figures of every bake, then Q4_0 perplexity with θ off and on.

    .venv/bin/python benchmarks/so8t_quality.py [--rank 8] [--chunks 16] [--gamma 1.0] > so8t_quality.json

Every row is `convert --outtype Q4_0 --theta-rank R --so8t MODE` on SmolLM2-135M-Instruct Q4_1:
- none: no rotation (plain Q4_0 + θ);
- fold: RMSNorm weights folded into the next matrices, identity rotation (separates the fold from the rotation);
- hadamard, random (seed 0), random with R2 per head (seed 0).
Perplexity follows llama-perplexity on the evaluation split, n_ctx 512, in one NkatRuntime per file: θ off is
the adapter removed (set_gamma(None)), θ on is γ = --gamma. The Q4_1 input is measured too, for reference.
A trained-gate (`file:`) bake is QC-checked as well: random generators on every attn_output and ffn_down
(it changes the model, so it has no perplexity row), to show reference-vs-llama.cpp agreement under QC.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_gguf.convert import ConvertOptions, convert  # noqa: E402
from nkat_gguf.default_model import default_model_path  # noqa: E402
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text  # noqa: E402
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions  # noqa: E402
from nkat_gguf.format.gguf_file import read_layout  # noqa: E402
from nkat_gguf.so8t import So8tOptions  # noqa: E402
from nkat_gguf.so8t.bake import BakePlan  # noqa: E402
from nkat_gguf.so8t.rotations import BLOCK  # noqa: E402
from nkat_gguf.texts import load_text  # noqa: E402


def identity_plan(d_model: int) -> BakePlan:
    return BakePlan("fold", residual=np.tile(np.eye(BLOCK), (d_model // BLOCK, 1, 1)))


def gate_checkpoint(model: Path, dst: Path) -> Path:
    """Random skew generators (alpha 0) on every attn_output and ffn_down weight of the model."""
    rng = np.random.default_rng(0)
    tensors = {}
    for t in read_layout(model).tensors:
        if t.name.endswith((".attn_output.weight", ".ffn_down.weight")):
            g = rng.standard_normal((t.shape[0] // BLOCK, BLOCK, BLOCK)).astype(np.float32)
            tensors[f"{t.name}.so8t_generator"] = (g - g.transpose(0, 2, 1)) / 2
            tensors[f"{t.name}.so8t_alpha"] = np.zeros((), np.float32)
    save_file(tensors, dst)
    return dst


def measure(path: Path, tokens_text: str, chunks: int, gamma: float | None) -> dict:
    """Perplexity with θ off and, if the file has θ, on at `gamma`, in one runtime."""
    out = {}
    with NkatRuntime(path, RuntimeOptions(n_ctx=512, n_batch=512)) as runtime:
        tokens = tokenize_text(runtime.llm, tokens_text)
        settings = {"theta_off": None} | ({"theta_on": gamma} if runtime.has_theta else {})
        for name, g in settings.items():
            runtime.set_gamma(g)
            out[name] = perplexity(runtime.llm, tokens, 512, chunks, progress=False).as_dict()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--gamma", type=float, default=1.0, help="γ for the θ-on rows")
    args = parser.parse_args()

    model = default_model_path()
    text = load_text(None, "evaluation")
    d_model = read_layout(model).get("llama.embedding_length")
    rows: dict[str, So8tOptions] = {"none": So8tOptions(), "fold": So8tOptions(identity_plan(d_model)),
                                    "hadamard": So8tOptions("hadamard"), "random": So8tOptions("random", seed=0),
                                    "random+R2": So8tOptions("random", seed=0, heads=True)}
    result: dict = {"command": "python benchmarks/so8t_quality.py " + " ".join(sys.argv[1:]), "model": model.name,
                    "outtype": "Q4_0", "theta_rank": args.rank, "gamma_on": args.gamma, "n_ctx": 512,
                    "chunks": args.chunks, "text": text.source, "text_sha256": text.sha256,
                    "input_q4_1": measure(model, text.content, args.chunks, None)["theta_off"], "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, so8t in rows.items():
            out = Path(tmp) / f"{name}.gguf"
            t = time.perf_counter()
            report = convert(ConvertOptions(input=model, output=out, outtype="Q4_0", theta_rank=args.rank,
                                            progress=False, so8t=so8t))
            row = {"convert_seconds": time.perf_counter() - t, "phases": report.seconds,
                   "file_bytes": out.stat().st_size, "qc": report.so8t["qc"] if report.so8t else None,
                   "perplexity": measure(out, text.content, args.chunks, args.gamma)}
            result["rows"][name] = row
            print(f"{name}: {json.dumps(row['perplexity'])}", file=sys.stderr)
            out.unlink()
        checkpoint = gate_checkpoint(model, Path(tmp) / "gates.safetensors")
        gated = convert(ConvertOptions(input=model, output=Path(tmp) / "gated.gguf", outtype="Q4_0", theta_rank=0,
                                       imatrix="none", progress=False,
                                       so8t=So8tOptions(f"file:{checkpoint}")))
        result["file_gates_qc"] = gated.so8t
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
