"""Which θ fit wins for the same bytes, on text like the calibration text and on text of another domain.

    nice -n 10 .venv/bin/python benchmarks/theta_fit.py [--study fits,tokens,gamma] [--chunks 8] \
        [--threads 2] [--cache theta_fit.jsonl] > theta_fit.json

Every row is a real file `convert` writes from the default model (SmolLM2-135M-Instruct Q4_1; the
reference is its dequantized weights) at θ rank 8 on all 210 block weights (equal θ bytes in every
row), measured with llama-perplexity's method on 8 chunks of 512 of two texts: the pydoc evaluation
split (like the calibration text) and Debian's licence texts (legal prose). Each row reports the
share of the gap between plain Q4_0 (no importance matrix) and the Q4_1 reference it recovers.

Studies (one calibration per token count serves the importance matrix and θ of its rows):
- fits: bases Q4_0 and IQ4_NL with the importance matrix; θ off, diagonal scaling undamped (the old
  default) and damped, whitening at three dampings (at damping 0.01 also γ 0.8-1.1, in one runtime,
  γ switched without reloading), and LoftQ-style joint rounds.
- tokens: whitening calibrated on 2,048 and 8,192 tokens (the fits use 16,384: 32 windows of 512,
  nearly all of the calibration split's 17,186 tokens).
Rows are appended to --cache as they are measured, so a rerun resumes; the JSON goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_gguf.engine.perplexity import perplexity, tokenize_text  # noqa: E402
from nkat_gguf.engine.runtime import NkatRuntime, RuntimeOptions  # noqa: E402
from nkat_gguf.convert.calibrate import Calibration, calibrate  # noqa: E402
from nkat_gguf.convert import ConvertOptions, convert  # noqa: E402
from nkat_gguf.default_model import default_model_path  # noqa: E402
from nkat_gguf.texts import load_text  # noqa: E402
from nkat_gguf.convert.theta_fit import DEFAULT_DAMPING  # noqa: E402
from nkat_gguf.format.tensors import TensorSource  # noqa: E402

TEXTS = ("evaluation", "licenses")
TOKENS = {2048: (8, 256), 8192: (16, 512), 16384: (32, 512)}  # calibration tokens -> (windows, length)
MAIN_TOKENS = 16384
RANK = 8
GAMMAS = (0.8, 0.9, 1.0, 1.1)  # measured on the main whitened rows (one runtime, γ switched without reloading)


@dataclass(frozen=True)
class Variant:
    name: str
    outtype: str
    imatrix: str = "auto"
    rank: int = RANK
    fit: str = "whiten"
    damping: float | None = None
    rounds: int = 1
    tokens: int = MAIN_TOKENS
    gammas: tuple[float, ...] = (1.0,)


def fit_variants(bases: list[str]) -> list[Variant]:
    """Most telling rows first (both bases each time), so a partial run already compares the main fits."""
    def per_base(make) -> list[Variant]:
        return [make(base) for base in bases]

    rows = per_base(lambda b: Variant(f"{b} imatrix", b, rank=0))
    rows += per_base(lambda b: Variant(f"{b} diag damping 0 (old default)", b, fit="diag", damping=0.0))
    rows += per_base(lambda b: Variant(f"{b} whiten damping 0.01", b, fit="whiten", damping=0.01, gammas=GAMMAS))
    for d in (0.1, 0.001):
        rows += per_base(lambda b: Variant(f"{b} whiten damping {d:g}", b, fit="whiten", damping=d))
    for d in (0.01, 0.1):
        rows += per_base(lambda b: Variant(f"{b} diag damping {d:g}", b, fit="diag", damping=d))
    rows += per_base(lambda b: Variant(f"{b} whiten 3 joint rounds", b, fit="whiten", rounds=3))
    return rows


def token_variants(bases: list[str]) -> list[Variant]:
    return [Variant(f"{base} whiten {tokens} tokens", base, fit="whiten", tokens=tokens)
            for tokens in TOKENS if tokens != MAIN_TOKENS for base in bases]


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.workdir = args, workdir
        self.model = default_model_path()
        self.calibrations: dict[int, Calibration] = {}
        self.texts = {name: load_text(None, name).content for name in TEXTS}
        self.done: dict[str, dict] = {}
        if args.cache.exists():
            for line in args.cache.read_text().splitlines():
                row = json.loads(line)
                self.done[row["name"]] = row

    def calibration(self, tokens: int) -> Calibration:
        if tokens not in self.calibrations:
            source = TensorSource(self.model)
            n_seq, length = TOKENS[tokens]
            t = time.perf_counter()
            self.calibrations[tokens] = calibrate(source, source.dequantize, self.model, load_text(None, "calibration"),
                                                  second_moments=True, n_seq=n_seq, length=length)
            print(f"calibration {tokens} tokens: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        return self.calibrations[tokens]

    def measure_file(self, path: Path, gammas: tuple[float | None, ...]) -> dict[str, dict[str, float]]:
        """Perplexity per γ (None: θ off) per text, in one runtime."""
        out: dict[str, dict[str, float]] = {}
        with NkatRuntime(path, RuntimeOptions(n_ctx=512, n_batch=512, n_threads=self.args.threads)) as rt:
            for text, content in self.texts.items():
                tokens = tokenize_text(rt.llm, content)
                for gamma in gammas:
                    rt.set_gamma(gamma)
                    ppl = perplexity(rt.llm, tokens, 512, self.args.chunks, progress=False)
                    out.setdefault("off" if gamma is None else f"{gamma:g}", {})[text] = ppl.ppl
        return out

    def row(self, v: Variant) -> dict:
        if v.name in self.done:
            return self.done[v.name]
        output = self.workdir / "file.gguf"
        opts = ConvertOptions(input=self.model, output=output, outtype=v.outtype, theta_rank=v.rank,
                              theta_gamma=1.0, imatrix=v.imatrix, theta_fit=v.fit, theta_damping=v.damping,
                              theta_rounds=v.rounds, threads=self.args.threads, progress=False)
        calibration = None if v.imatrix == "none" and v.rank == 0 else self.calibration(v.tokens)
        report = convert(opts, calibration)
        gammas: tuple[float | None, ...] = v.gammas if v.rank else (None,)
        rounds = [t["round"] for t in report.tensors.values()]
        row = {"name": v.name, "outtype": v.outtype, "imatrix": v.imatrix, "theta_rank": v.rank, "fit": v.fit,
               "damping": DEFAULT_DAMPING[v.fit] if v.damping is None else v.damping, "rounds": v.rounds,
               "calibration_tokens": calibration.tokens if calibration else 0, "file_bytes": report.output_bytes,
               "convert_seconds": report.seconds, "weights_from_joint_rounds": sum(r > 0 for r in rounds),
               "expected_output_error": sum(t["expected_output_error"] for t in report.tensors.values()),
               "ppl": self.measure_file(output, gammas)}
        with open(self.args.cache, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.done[v.name] = row
        print(f"{v.name}: {row['ppl']}", file=sys.stderr)
        return row


def gap_shares(rows: list[dict], plain: dict, reference: dict) -> None:
    """Share of the plain-Q4_0 → reference gap per text and γ, and the worse of the two texts."""
    for row in rows:
        row["gap_recovered"] = {}
        for gamma, by_text in row["ppl"].items():
            shares = {t: (plain["ppl"]["off"][t] - p) / (plain["ppl"]["off"][t] - reference["ppl"]["off"][t])
                      for t, p in by_text.items()}
            row["gap_recovered"][gamma] = shares | {"worse": min(shares.values())}


def markdown_table(cached: list[dict]) -> str:
    """One line per row and γ: MiB, perplexity and gap share on each text, and the worse share."""
    by_name = {row["name"]: row for row in cached}
    reference, plain = by_name.pop("reference"), by_name["Q4_0 plain (no importance matrix)"]
    rows = list(by_name.values())
    gap_shares(rows, plain, reference)
    lines = ["| row | γ | MiB | PPL pydoc | PPL licences | gap pydoc | gap licences | worse |",
             "|---|---|---|---|---|---|---|---|",
             f"| Q4_1 reference | – | {reference['file_bytes'] / 2**20:.2f} | {reference['ppl']['off']['evaluation']:.4f} "
             f"| {reference['ppl']['off']['licenses']:.4f} | 100 % | 100 % | |"]
    for row in rows:
        for gamma, ppl in row["ppl"].items():
            share = row["gap_recovered"][gamma]
            lines.append(f"| {row['name']} | {gamma} | {row['file_bytes'] / 2**20:.2f} | {ppl['evaluation']:.4f} "
                         f"| {ppl['licenses']:.4f} | {100 * share['evaluation']:.1f} % | {100 * share['licenses']:.1f} % "
                         f"| {100 * share['worse']:.1f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="fits,tokens")
    parser.add_argument("--bases", default="Q4_0,IQ4_NL")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("theta_fit.jsonl"))
    parser.add_argument("--table", action="store_true", help="print the cached rows as a Markdown table; measure nothing")
    args = parser.parse_args()
    if args.table:
        print(markdown_table([json.loads(line) for line in args.cache.read_text().splitlines()]))
        return
    bases = args.bases.split(",")
    studies = {"fits": fit_variants, "tokens": token_variants}
    with tempfile.TemporaryDirectory(prefix="nkat-theta-fit-") as tmp:
        bench = Bench(args, Path(tmp))
        reference = bench.done.get("reference") or _reference_row(bench)
        plain = bench.row(Variant("Q4_0 plain (no importance matrix)", "Q4_0", imatrix="none", rank=0))
        rows = [bench.row(v) for study in args.study.split(",") for v in studies[study](bases)]
    gap_shares([plain, *rows], plain, reference)
    print(json.dumps({"model": str(bench.model), "chunks": args.chunks, "n_ctx": 512, "theta_rank": RANK,
                      "texts": {t: load_text(None, t).source for t in TEXTS},
                      "reference": reference, "plain": plain, "rows": rows}, indent=1))


def _reference_row(bench: Bench) -> dict:
    row = {"name": "reference", "file_bytes": bench.model.stat().st_size,
           "ppl": bench.measure_file(bench.model, (None,))}
    with open(bench.args.cache, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
