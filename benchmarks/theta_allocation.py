"""θ allocated under a byte/operation budget vs uniform rank at equal bytes, on two texts, with speed, as JSON.

For each base type (with the importance matrix from one shared calibration): the file with θ off, θ at a
uniform rank on all weights, and `--theta-budget` allocations at the *same θ bytes* as the uniform file
with several `--theta-max-weights`. Each base is quantized and fitted once (convert's own fit pass,
`allocate_step.fit_pass`, with its per-kind sensitivity on calibration text); every variant is that
fit cut to its ranks and written by the format's writer, as `convert --theta-budget` writes it. Every file is measured on both evaluation texts (pydoc evaluation
split, Debian licences; 8 chunks of 512) as the share of the gap between plain Q4_0 without importance
matrix and the Q4_1 reference that it recovers, and for speed θ on vs θ off of the same file,
interleaved in one process. `--kinds` also measures θ of the uniform Q4_0 file on one weight kind at a
time on both texts (a report of which kinds pay; the allocation itself never sees the evaluation texts).

    .venv/bin/python benchmarks/theta_allocation.py --threads 2 --out /tmp/alloc.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.convert.allocate import FitPass, fit_pass
from nkat_gguf.convert.selection import select_tensors
from nkat_gguf.convert.theta_fit import FitSettings  # noqa: E402
from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.measure.speed import SpeedSettings, interleaved_speed
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.evaluate.quality import calibrate_once
from nkat_gguf.format.gguf_file import write_with_metadata
from nkat_gguf.format.nkat import PREFIX, NkatTheta, component_bytes, listing_bytes, read_theta, theta_metadata
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.allocation import KINDS, MIB, weight_kind
from nkat_gguf.texts import load_text

TEXTS = ("evaluation", "licenses")


def uniform_theta_bytes(model: Path, rank: int) -> int:
    """Per-weight θ bytes of uniform rank r on convert's default weights: the equal-bytes budget."""
    source = TensorSource(model)
    return sum(listing_bytes(n) + rank * component_bytes(*source.numpy_shape(n))
               for n in select_tensors(source.layout, None))


def ppl_of(runtime: NkatRuntime, tokens: dict[str, list[int]], gamma: float | None, chunks: int) -> dict[str, float]:
    runtime.set_gamma(gamma)
    return {t: perplexity(runtime.llm, tokens[t], 512, chunks, progress=False).ppl for t in TEXTS}


def gap_share(ppl: dict[str, float], plain: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    return {t: (plain[t] - ppl[t]) / (plain[t] - reference[t]) for t in TEXTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the embedded SmolLM2 Q4_1")
    parser.add_argument("--outtypes", default="Q4_0,IQ4_NL")
    parser.add_argument("--rank", type=int, default=8, help="the uniform rank; the budget is its θ bytes")
    parser.add_argument("--max-weights", default="none,120,90,60", help="comma list; none = no operation budget")
    parser.add_argument("--budgets", default="", help="extra budgets in MiB (e.g. 1.5MiB,4MiB), with no max-weights")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=3, help="interleaved speed rounds per file (0: no speed)")
    parser.add_argument("--kinds", action="store_true", help="also θ per weight kind on the uniform Q4_0 file")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nkat-theta-allocation"))
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--reuse", action="store_true", help="keep base files already in --work (same options)")
    args = parser.parse_args()

    model = args.model or default_model_path()
    args.work.mkdir(parents=True, exist_ok=True)
    calibration = calibrate_once(model, None, None, progress=False)
    budget_bytes = uniform_theta_bytes(model, args.rank)
    runtime_options = RuntimeOptions(n_ctx=512, n_batch=512, n_threads=args.threads)
    texts = {t: load_text(None, t).content for t in TEXTS}

    def build(name: str, **kw: object) -> tuple[Path, dict]:
        out = args.work / f"{name}.gguf"
        if out.exists() and args.reuse:
            return out, {}
        report = convert(ConvertOptions(input=model, output=out, threads=args.threads, progress=False, **kw),
                         calibration if kw.get("imatrix") != "none" else None)
        return out, report.as_dict()

    plain, _ = build("plain-Q4_0", outtype="Q4_0", theta_rank=0, imatrix="none")
    with NkatRuntime(model, runtime_options) as rt:
        tokens = {t: tokenize_text(rt.llm, texts[t]) for t in TEXTS}
        reference = ppl_of(rt, tokens, None, args.chunks)
    with NkatRuntime(plain, runtime_options) as rt:
        plain_ppl = ppl_of(rt, tokens, None, args.chunks)
    rows = []

    def measure(name: str, path: Path, report: dict, base_bytes: int) -> dict:
        with NkatRuntime(path, runtime_options) as rt:
            ppl = ppl_of(rt, tokens, rt.resolve_gamma(), args.chunks)  # θ off where the file has none
            speed = None
            if rt.has_theta and args.repetitions:
                settings = SpeedSettings(repetitions=args.repetitions, progress=False)
                s = interleaved_speed(rt, {"off": None, "on": rt.resolve_gamma()}, settings)
                speed = {"tg_ratio": s["on"]["tg_tokens_per_second"] / s["off"]["tg_tokens_per_second"],
                         "pp_ratio": s["on"]["pp_tokens_per_second"] / s["off"]["pp_tokens_per_second"], "raw": s}
            theta = rt.theta
        row = {"name": name, "file": str(path), "file_mib": path.stat().st_size / MIB,
               "theta_mib": (path.stat().st_size - base_bytes) / MIB, "ppl": ppl,
               "gap_share": gap_share(ppl, plain_ppl, reference),
               "weights": len(theta.tensors) if theta else 0,
               "weights_by_kind": {k: sum(weight_kind(n) == k for n in (theta.tensors if theta else {})) for k in KINDS},
               "rank_by_kind": {k: sum(t.rank for n, t in (theta.tensors if theta else {}).items()
                                       if weight_kind(n) == k) for k in KINDS},
               "speed": speed, "allocation": report.get("allocation"), "seconds": report.get("seconds")}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("name", "file_mib", "gap_share", "weights")} | {"speed": speed and {
            k: speed[k] for k in ("tg_ratio", "pp_ratio")}}), file=sys.stderr, flush=True)
        return row

    kinds = None
    source = TensorSource(model)
    names = select_tensors(source.layout, None)
    gamma = ConvertOptions(input=model, output=model).gamma

    def write_variant(base: Path, name: str, fits: dict) -> Path:
        out = args.work / f"{name}.gguf"
        theta = NkatTheta(gamma, {n: f.theta for n, f in fits.items()}, read_theta(base).provenance)
        write_with_metadata(base, out, theta_metadata(theta), drop_prefixes=(PREFIX,))
        return out

    for outtype in args.outtypes.split(","):  # allocations first: the figures that matter most come out first
        base, base_report = build(f"{outtype}-imatrix", outtype=outtype, theta_rank=0)
        base_bytes = base.stat().st_size
        fitted: FitPass = fit_pass(base, source.dequantize, names, calibration, load_text(None, "calibration"),
                                   gamma, FitSettings(), args.work, args.threads, progress=False)
        budgets = [(budget_bytes, m) for m in args.max_weights.split(",")]
        budgets += [(int(float(b.removesuffix("MiB")) * MIB), "none") for b in args.budgets.split(",") if b]
        for i, (budget, max_weights) in enumerate(budgets):
            mw = None if max_weights == "none" else int(max_weights)
            allocation = fitted.allocate(budget, mw)
            path = write_variant(base, f"{outtype}-budget{budget}-mw{max_weights}", allocation.fits)
            measure(f"{outtype}+imatrix+θ budget {budget / MIB:.3f} MiB max-weights {max_weights}", path,
                    {"allocation": allocation.summary()}, base_bytes)
            if i == 0:
                uniform = write_variant(base, f"{outtype}-r{args.rank}", fitted.fits(dict.fromkeys(names, args.rank)))
                measure(f"{outtype}+imatrix+θ r{args.rank} uniform", uniform, {}, base_bytes)
                measure(f"{outtype}+imatrix", base, base_report, base_bytes)
        if args.kinds and kinds is None:
            kinds = per_kind(uniform, tokens, runtime_options, args.chunks, plain_ppl, reference)
    print(json.dumps({"reference_Q4_1": reference, "plain_Q4_0": plain_ppl, "budget_bytes": budget_bytes,
                      "rows": rows, "per_kind": kinds, "chunks": args.chunks, "threads": args.threads,
                      "command": "python benchmarks/theta_allocation.py " + " ".join(sys.argv[1:])}, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "per_kind": kinds, "reference_Q4_1": reference,
                                        "plain_Q4_0": plain_ppl, "budget_bytes": budget_bytes}, indent=1))


def per_kind(path: Path, tokens: dict[str, list[int]], options: RuntimeOptions, chunks: int,
             plain: dict[str, float], reference: dict[str, float]) -> dict[str, dict]:
    """θ of one weight kind only (and of attention / FFN only), on both evaluation texts."""
    full = read_theta(path)
    groups = {k: [k] for k in KINDS} | {"attention": [k for k in KINDS if k.startswith("attn")],
                                        "ffn": [k for k in KINDS if k.startswith("ffn")]}
    out = {}
    with NkatRuntime(path, options) as rt:
        off = ppl_of(rt, tokens, None, chunks)
        out["off"] = {"ppl": off, "gap_share": gap_share(off, plain, reference)}
        for group, kinds in groups.items():
            rt.use_theta(NkatTheta(full.gamma, {n: t for n, t in full.tensors.items() if weight_kind(n) in kinds}),
                         full.gamma)
            ppl = ppl_of(rt, tokens, full.gamma, chunks)
            out[group] = {"ppl": ppl, "gap_share": gap_share(ppl, plain, reference),
                          "vs_off": {t: math.log(ppl[t] / off[t]) for t in TEXTS}}
    return out


if __name__ == "__main__":
    main()
