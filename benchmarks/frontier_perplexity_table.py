"""The frontier table from perplexity alone, for files a `nkat-gguf frontier --out-dir D` run wrote.

On a loaded two-core machine the frontier run's interleaved speed rounds over 24 files did not finish
in time, so benchmarks/frontier_perplexity.sh measured the files it had written with
`nkat-gguf perplexity` (both texts, 4 chunks of 512, one thread) into a JSON-lines file; this script
turns that into the frontier analysis with the same functions the command uses (gap shares, the
envelope of the llama.cpp types, the verdict per NKAT file, the default candidate). No speed figures.

    bash benchmarks/frontier_perplexity.sh
    .venv/bin/python benchmarks/frontier_perplexity_table.py /tmp/fr/ppl/ppl.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from nkat_gguf.evaluate.frontier import _add_gaps, _against_frontier, default_candidate, lower_envelope, tensor_types
from nkat_gguf.format.hashing import sha256_file

_NAME = re.compile(r"\.(?P<type>[A-Z0-9_]+)\.(?P<how>plain|imatrix)(?:\.theta-r(?P<rank>\d+)-(?P<weights>\w+))?\.gguf$")


def rows_from(lines: list[dict]) -> list[dict]:
    rows: dict[str, dict] = {}
    for entry in lines:
        path = Path(entry["file"])
        m = _NAME.search(path.name)
        if m is None:
            name, kind, base = "reference", "reference", None
        elif m["how"] == "plain":
            name, kind, base = f"{m['type']} plain", "plain", None
        elif m["rank"] is None:
            name, kind, base = f"{m['type']}+imatrix", "imatrix", None
        else:
            suffix = "" if m["weights"] == "all" else f" {m['weights']}"
            name, kind, base = f"{m['type']}+imatrix+θ r{m['rank']}{suffix}", "nkat", f"{m['type']}+imatrix"
        row = rows.setdefault(name, {"name": name, "kind": kind, "base": base, "file": path.name,
                                     "file_bytes": path.stat().st_size, "sha256": sha256_file(path),
                                     "tensor_types": tensor_types(path), "perplexity": {}})
        r = entry["result"]
        row["perplexity"][entry["text"]] = {"ppl": r["ppl"], "ppl_stderr": r["ppl_stderr"], "chunks": r["n_chunks"]}
    complete = [r for r in rows.values() if len(r["perplexity"]) == 2]
    return [r for r in complete if r["kind"] != "nkat" or any(b["name"] == r["base"] for b in complete)]


def main(path: Path) -> None:
    lines, text, decoder, at = [], path.read_text(), json.JSONDecoder(), 0
    while (at := text.find("{", at)) >= 0:  # entries of pretty-printed JSON, one after another
        entry, at = decoder.raw_decode(text, at)
        lines.append(entry)
    rows = rows_from(lines)
    keys = ["evaluation", "licenses"]
    _add_gaps(rows, keys)
    envelopes = {k: lower_envelope(rows, k) for k in keys}
    for row in rows:
        if row["kind"] == "nkat":
            row["frontier"] = {k: _against_frontier(row, envelopes[k], k) for k in keys}
    mib = 1 << 20
    print("| file | MiB | pydoc ppl (gap) | licences ppl (gap) | best llama.cpp type ≤ its size (pydoc / licences) "
          "| beats it on both |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["kind"] == "nkat", r["file_bytes"])):
        cells = [f"{r['perplexity'][k]['ppl']:.3f} ({100 * r['gap_recovered'][k]:.1f} %)" for k in keys]
        if "frontier" in r:
            best = " / ".join(f"{v['best_type']} {v['best_ppl']:.3f}" for v in r["frontier"].values())
            beats = "yes" if all(v["beats"] for v in r["frontier"].values()) else \
                "no (" + ", ".join(k for k, v in r["frontier"].items() if not v["beats"]) + ")"
        else:
            best = beats = ""
        print(f"| {r['name']} | {r['file_bytes'] / mib:.2f} | {cells[0]} | {cells[1]} | {best} | {beats} |")
    for k in keys:
        steps = [f"{r['name']} ({r['file_bytes'] / mib:.2f} MiB)" for r in envelopes[k]]
        print(f"\nfrontier on {k}: " + " < ".join(steps))
    print(f"\ndefault candidate (≤ +3 % over its base, beats the frontier on both texts, best worse-text gap share): "
          f"{default_candidate(rows)}")
    print("\nsha256: " + ", ".join(f"{r['name']} {r['sha256'][:12]}" for r in rows))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/frontier_perplexity_table.py PPL.jsonl")
    main(Path(sys.argv[1]))
