"""γ measured, not assumed: mean KLD and perplexity of one NKAT file at several γ, on both evaluation texts.

γ is a run-time scale of θ (the adapter's scale), so one file serves every γ: the reference's log-probabilities
are written once per text (llama-perplexity's base-file format, engine/measure/kld.py), then the file is compared with
them at each γ and with θ off. The γ stored by `convert` should be the one with the lowest mean KLD on the
worse text (DEVELOPERS.md: defaults are chosen on the worse text).

    .venv/bin/python benchmarks/gamma_sweep.py --model OUT.nkat.gguf --gammas 0.8,0.9,0.97,1.0,1.1 --chunks 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.measure.kld import measure_model
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.texts import load_text

TEXTS = ("evaluation", "licenses")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--reference", type=Path, default=None, help="default: the embedded default model")
    parser.add_argument("--gammas", default="0.8,0.9,0.97,1.0,1.1")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    reference = args.reference or default_model_path()
    options = RuntimeOptions(n_ctx=512, n_batch=512, n_threads=args.threads)
    gammas = [float(g) for g in args.gammas.split(",")]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="nkat-gamma-") as tmp:
        for key in TEXTS:
            text = load_text(None, key)
            base = Path(tmp) / f"{key}.kld"
            measure_model(reference, options, False, None, text, 512, args.chunks, base=base, progress=False)
            for gamma in [None, *gammas]:
                r = measure_model(args.model, options, gamma is not None, gamma, None, None, None, base=base,
                                  compare_with_base=True, progress=False)
                name = "theta_off" if gamma is None else f"{gamma:g}"
                rows.setdefault(name, {})[key] = {"ppl": r["ppl"], "kld": r["kld"]["kld"],
                                                  "kld_ci95": r["kld"]["kld_ci95"], "same_top": r["kld"]["same_top"]}
                print(f"{key} γ {name}: KLD {r['kld']['kld']:.5f}, ppl {r['ppl']:.4f}", file=sys.stderr)
    worse = {name: max(v[k]["kld"] for k in TEXTS) for name, v in rows.items()}
    best = min((n for n in worse if n != "theta_off"), key=worse.get)
    print(json.dumps({"model": str(args.model), "reference": str(reference), "chunks": args.chunks,
                      "command": " ".join(sys.argv), "rows": rows, "worse_text_kld": worse,
                      "best_gamma_on_worse_text": float(best)}, indent=2))


if __name__ == "__main__":
    main()
