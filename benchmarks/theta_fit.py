"""Which θ fit wins for the same bytes, on text like the calibration text and on text of another domain.

    nice -n 10 .venv/bin/python benchmarks/theta_fit.py [--bases Q4_0,IQ4_NL] [--chunks 8] [--threads 1] \
        [--cache theta_fit.jsonl] [--workdir theta_fit_files] > theta_fit.json
    .venv/bin/python benchmarks/theta_fit.py --cache theta_fit.jsonl --table   # the rows so far, as Markdown

Every row is a real file `convert` writes from the default model (SmolLM2-135M-Instruct Q4_1; the
reference is its dequantized weights) at θ rank 8 on all 210 block weights (equal θ bytes in every
row), measured with llama-perplexity's method on 8 chunks of 512 of two texts: the pydoc evaluation
split (like the calibration text) and Debian's licence texts (legal prose). Each row reports the
share of the gap between plain Q4_0 (no importance matrix) and the Q4_1 reference it recovers.

Rows, most telling first (one calibration per token count serves the importance matrix and θ):
diagonal scaling undamped (the old default) against whitening at damping 0.01 on both bases, γ 0.9 and
1.1, other dampings of both fits, LoftQ-style joint rounds, 16,384 calibration tokens instead of 2,048,
and θ off (the importance matrix alone).
Rows are appended to --cache as they are measured, so a rerun resumes; the JSON goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_gguf.convert import ConvertOptions, convert  # noqa: E402
from nkat_gguf.convert.calibrate import Calibration, calibrate  # noqa: E402
from nkat_gguf.convert.theta_fit import DEFAULT_DAMPING  # noqa: E402
from nkat_gguf.default_model import default_model_path  # noqa: E402
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text  # noqa: E402
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions  # noqa: E402
from nkat_gguf.texts import load_text  # noqa: E402

TEXTS = ("evaluation", "licenses")
MAIN_TOKENS = 2048  # the seed's calibration size; convert's default is now 16,384 (32 windows of 512)
RANK = 8


@dataclass(frozen=True)
class Variant:
    label: str  # what the conversion is; `name` adds the calibration size and γ
    outtype: str
    imatrix: str = "auto"
    rank: int = RANK
    fit: str = "whiten"
    damping: float | None = None
    rounds: int = 1
    tokens: int = MAIN_TOKENS
    gamma: float = 1.0

    @property
    def file_key(self) -> str:
        """One converted file per conversion; rows that differ only in γ share it."""
        return f"{self.label} {self.tokens} tokens".replace(" ", "_").replace("(", "").replace(")", "")

    @property
    def name(self) -> str:
        return f"{self.label}, {self.tokens} tokens" + (f", gamma {self.gamma:g}" if self.rank else "")


def main_variants(bases: list[str]) -> list[Variant]:
    """Most telling rows first, so a partial run (the cache keeps every row) already answers the main question."""
    first, other = bases[0], bases[1:]
    rows = [Variant(f"{first} diag damping 0 (old default)", first, fit="diag", damping=0.0),
            Variant(f"{first} whiten damping 0.01", first, fit="whiten", damping=0.01),
            Variant(f"{first} whiten damping 0.01", first, fit="whiten", damping=0.01, gamma=0.9)]
    for base in other:
        rows += [Variant(f"{base} whiten damping 0.01", base, fit="whiten", damping=0.01),
                 Variant(f"{base} diag damping 0 (old default)", base, fit="diag", damping=0.0),
                 Variant(f"{base} whiten damping 0.01", base, fit="whiten", damping=0.01, gamma=0.9)]
    rows += [Variant(f"{first} whiten damping 0.1", first, fit="whiten", damping=0.1),
             Variant(f"{first} diag damping 0.1", first, fit="diag", damping=0.1),
             Variant(f"{first} whiten 3 joint rounds", first, fit="whiten", damping=0.01, rounds=3),
             Variant(f"{first} whiten damping 0.01", first, fit="whiten", damping=0.01, tokens=16384),
             Variant(f"{first} whiten damping 0.01", first, fit="whiten", damping=0.01, gamma=1.1),
             Variant(f"{first} whiten damping 0.001", first, fit="whiten", damping=0.001)]
    rows += [Variant(f"{base} imatrix", base, rank=0) for base in bases]
    rows += [Variant(f"{base} whiten damping 0.1", base, fit="whiten", damping=0.1) for base in other]
    rows += [Variant(f"{base} diag damping 0.1", base, fit="diag", damping=0.1) for base in other]
    return rows


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
        """convert's own calibration (llama.cpp, consecutive windows of 512), E[x xᵀ] included."""
        if tokens not in self.calibrations:
            t = time.perf_counter()
            self.calibrations[tokens] = calibrate(self.model, load_text(None, "calibration"), tokens,
                                                  second_moments=True, threads=self.args.threads, progress=False)
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

    def converted(self, v: Variant) -> tuple[Path, dict]:
        """The file of this conversion and its convert report, converted once and kept in --workdir."""
        output, report_path = self.workdir / f"{v.file_key}.gguf", self.workdir / f"{v.file_key}.json"
        if not report_path.exists():
            opts = ConvertOptions(input=self.model, output=output, outtype=v.outtype, theta_rank=v.rank,
                                  gamma=v.gamma, imatrix=v.imatrix, theta_fit=v.fit, theta_damping=v.damping,
                                  theta_rounds=v.rounds, threads=self.args.threads, progress=False)
            report = convert(opts, self.calibration(v.tokens)).as_dict()
            report_path.write_text(json.dumps(report))
        return output, json.loads(report_path.read_text())

    def row(self, v: Variant) -> dict:
        if v.name in self.done:
            return self.done[v.name]
        output, report = self.converted(v)
        tensors = report["tensors"].values()
        row = {"name": v.name, "outtype": v.outtype, "imatrix": v.imatrix, "theta_rank": v.rank, "fit": v.fit,
               "damping": DEFAULT_DAMPING[v.fit] if v.damping is None else v.damping, "rounds": v.rounds,
               "calibration_tokens": v.tokens, "gamma": v.gamma if v.rank else None,
               "file_bytes": report["output_bytes"], "convert_seconds": report["seconds"],
               "weights_from_joint_rounds": sum(t["round"] > 0 for t in tensors),
               "expected_output_error": sum(t["expected_output_error"] for t in tensors),
               "ppl": self.measure_file(output, (v.gamma if v.rank else None,))}
        self.save(row)
        print(f"{v.name}: {row['ppl']}", file=sys.stderr)
        return row

    def plain(self) -> dict:
        """Plain Q4_0, no importance matrix and no θ: the bottom of the gap (no calibration needed)."""
        name = "Q4_0 plain (no importance matrix)"
        if name not in self.done:
            output = self.workdir / "plain.gguf"
            convert(ConvertOptions(input=self.model, output=output, outtype="Q4_0", theta_rank=0, imatrix="none",
                                   threads=self.args.threads, progress=False))
            self.save({"name": name, "file_bytes": output.stat().st_size, "ppl": self.measure_file(output, (None,))})
        return self.done[name]

    def reference(self) -> dict:
        if "reference" not in self.done:
            self.save({"name": "reference", "file_bytes": self.model.stat().st_size,
                       "ppl": self.measure_file(self.model, (None,))})
        return self.done["reference"]

    def save(self, row: dict) -> None:
        with open(self.args.cache, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.done[row["name"]] = row


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
    parser.add_argument("--workdir", type=Path, default=Path("theta_fit_files"),
                        help="converted files and their reports, kept so a rerun or another γ reuses them")
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
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, args.workdir)
    reference, plain = bench.reference(), bench.plain()
    rows = [bench.row(v) for v in main_variants(bases)]
    gap_shares([plain, *rows], plain, reference)
    print(json.dumps({"model": str(bench.model), "chunks": args.chunks, "n_ctx": 512, "theta_rank": RANK,
                      "texts": {t: load_text(None, t).source for t in TEXTS},
                      "reference": reference, "plain": plain, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
