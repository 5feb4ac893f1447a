"""`nkat-gguf frontier`: every llama.cpp type with the importance matrix, and the NKAT files, on two texts.

What a quality claim must beat is not plain quantization but llama.cpp's best type with the
importance matrix at equal or smaller size. This driver writes one file per llama.cpp type (with
the importance matrix), plain Q4_0 (no importance matrix: the zero point of the gap), and the NKAT
variants (θ on some of those bases), all from ONE calibration; then measures each file's size (the
file itself), perplexity on two texts of different domains, and speed interleaved in one process.
The frontier is the lower envelope of the llama.cpp types: at size s, the best perplexity of any
type of size <= s. An NKAT point counts only where it is below that envelope on both texts.
Every file's KL divergence from the reference rides on its perplexity pass, as llama-perplexity's
--kl-divergence computes it; the reference's log-probabilities are written once per text, as
llama-perplexity's base files, into the output directory, and reused by a later run on the same
reference, text and chunks. The default candidate is chosen on the worse text's mean KLD.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nkat_gguf.convert import ConvertOptions, ConvertReport, convert
from nkat_gguf.convert.calibrate import Calibration
from nkat_gguf.convert.selection import resolve_tensor_types, select_tensors
from nkat_gguf.engine.measure.bench import device_name
from nkat_gguf.engine.measure.speed import paired_ratio
from nkat_gguf.engine.llama.quantize import resolve_outtype
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.evaluate.compare import CompareSettings
from nkat_gguf.evaluate.plot_labels import place_labels
from nkat_gguf.evaluate.quality import calibrate_once, measure_files
from nkat_gguf.format.atomic import atomic_output, check_writable_dir, make_output_dir
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.math.limits import DEFAULT_BYTE_BUDGET, DEFAULT_OUTTYPE
from nkat_gguf.texts import Split, load_text

# The types the issue asks for first, then the rest of llama.cpp's types in the same size range.
DEFAULT_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL", "Q4_0",
                 "Q4_K_S", "Q4_K_M", "Q5_0")
AUTO_RANK = "auto"  # a --theta spec's RANK that leaves the ranks to convert's allocation, as `convert` does
# convert's own default (types and θ ranks allocated on its base type); uniform rank 4/8 on Q4_0 and IQ4_NL;
# FFN-only and attention-only θ; a 3-bit base with more θ
DEFAULT_THETA = (f"{DEFAULT_OUTTYPE}:{AUTO_RANK}", "Q4_0:4", "Q4_0:8", "Q4_0:8:ffn", "IQ4_NL:4", "IQ4_NL:8", "IQ4_NL:8:attn", "IQ4_NL:8:ffn",
                 "IQ4_NL:12:ffn", "IQ4_NL:16:ffn", "Q3_K_S:16")
TEXTS: tuple[Split, ...] = ("evaluation", "licenses")  # pydoc topics (not the calibration split); licence texts
DEFAULT_BUDGET = float(DEFAULT_BYTE_BUDGET.rstrip("%")) / 100  # the share the default convert may add to its base
PLAIN_TYPE = "Q4_0"  # plain Q4_0, no importance matrix: the zero point of the gap
# llama.cpp per-tensor mixes (`llama-quantize --tensor-type`): upgrades people make by hand on an IQ4_NL base, and
# the project's allocator with θ disabled (types only under a byte budget), all with the importance matrix.
# 32-wide blocks only, so that every model's rows hold them (K-quants need rows a multiple of 256: pass
# `--mix IQ4_NL:blk.*.ffn_down.weight=Q6_K` where they do).
DEFAULT_MIXES = ("IQ4_NL:blk.*.attn_v.weight=Q5_0,blk.*.ffn_down.weight=Q5_0",
                 "IQ4_NL:blk.*.attn_v.weight=Q8_0,blk.*.ffn_down.weight=Q5_1",
                 f"{DEFAULT_OUTTYPE}:byte_budget={DEFAULT_BYTE_BUDGET}")
FRONTIER_KINDS = ("imatrix", "mix")  # what an NKAT file must beat: llama.cpp's presets and per-tensor mixes
WEIGHT_SETS = {"all": None, "ffn": ["blk.*.ffn_*"], "attn": ["blk.*.attn_*"]}
_SETTABLE = {f.name for f in dataclasses.fields(ConvertOptions)} - {"input", "output", "reference", "outtype",
                                                                     "theta_rank", "selective_layers", "imatrix",
                                                                     "calib_text", "progress", "threads", "tensor_types"}
# spellings before issues 18 and 24's one name per idea, still accepted
_OLD_KEYS = {"theta_gamma": "gamma", "op_budget": "theta_weights", "theta_max_weights": "theta_weights"}


def _option_key(key: str) -> str:
    """A spec's `key` as the ConvertOptions field it names: dashes as underscores, old spellings mapped."""
    key = key.replace("-", "_")
    return _OLD_KEYS.get(key, key)


@dataclass(frozen=True)
class ThetaSpec:
    """One NKAT variant: θ of `rank` (None: ranks and types allocated, convert's default) on `weights` of a
    llama.cpp type quantized with the importance matrix.

    `options` are further ConvertOptions fields (`key=value` in the spec), so convert options that other
    work adds (budgets, allocations) can be measured here without changing this module.
    """
    base: str
    rank: int | None
    weights: str = "all"  # "all", "ffn", "attn", or comma-separated --selective-layers patterns
    options: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.options)
        ranks = "allocated" if self.rank is None else f"r{self.rank}"
        return f"{self.base}+imatrix+θ {ranks}" + ("" if self.weights == "all" else f" {self.weights}") + extra

    @property
    def patterns(self) -> list[str] | None:
        return WEIGHT_SETS[self.weights] if self.weights in WEIGHT_SETS else self.weights.split(",")


def parse_theta_spec(spec: str) -> ThetaSpec:
    """BASE:RANK[:WEIGHTS][:key=value...], e.g. "IQ4_NL:8", "Q4_0:4:ffn", "IQ4_NL:8:blk.*.ffn_down:gamma=1";
    RANK "auto": convert's allocation chooses types and ranks ("IQ4_NL:auto" is `convert`'s default)."""
    parts = spec.split(":")
    auto = len(parts) >= 2 and parts[1] == AUTO_RANK
    if len(parts) < 2 or not (auto or parts[1].isdigit() and int(parts[1]) >= 1):
        raise InputError(f"--theta {spec!r}: expected BASE:RANK[:WEIGHTS][:key=value], RANK an integer >= 1 "
                         f"or {AUTO_RANK}")
    positional = [p for p in parts[2:] if "=" not in p]
    if len(positional) > 1:
        raise InputError(f"--theta {spec!r}: one WEIGHTS field at most (all, ffn, attn or patterns joined by ',')")
    options = []
    for item in (p for p in parts[2:] if "=" in p):
        key, value = item.split("=", 1)
        key = _option_key(key)
        if key not in _SETTABLE:
            raise InputError(f"--theta {spec!r}: {key} is not a convert option; "
                             f"choose from {', '.join(sorted(_SETTABLE))}")
        options.append((key, _literal(value)))
    return ThetaSpec(parts[0].upper(), None if auto else int(parts[1]), positional[0] if positional else "all", tuple(options))


def _literal(value: str) -> object:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


@dataclass(frozen=True)
class MixSpec:
    """A llama.cpp per-tensor mix on a base type with the importance matrix, no θ: hand-chosen tensor types
    (`tensor_types`, patterns as --selective-layers) or the allocator's types (`options`, e.g. byte_budget)."""
    base: str
    tensor_types: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        if self.tensor_types:
            return f"{self.base}+imatrix+tensor-type " + ",".join(f"{p.removeprefix('blk.*.').removesuffix('.weight')}={t}"
                                                                  for p, t in self.tensor_types)
        return f"{self.base}+imatrix+allocator" + "".join(f" {k}={v}" for k, v in self.options)


def parse_mix_spec(spec: str) -> MixSpec:
    """BASE:PATTERN=TYPE,... or BASE:key=value (a convert option), e.g. "IQ4_NL:blk.*.attn_v=Q6_K",
    "IQ4_NL:byte_budget=3%"."""
    base, _, rest = spec.partition(":")
    items = [i for i in re.split(r"[,:]", rest) if i]
    if not base or not items or any("=" not in i for i in items):
        raise InputError(f"--mix {spec!r}: expected BASE:PATTERN=TYPE[,PATTERN=TYPE...] or BASE:key=value")
    types, options = [], []
    for item in items:
        key, value = item.split("=", 1)
        if _option_key(key) in _SETTABLE:
            options.append((_option_key(key), _literal(value)))
        else:
            types.append((key, value.upper()))
    return MixSpec(base.upper(), tuple(types), tuple(options))


@dataclass(frozen=True)
class FrontierSettings:
    types: tuple[str, ...] = DEFAULT_TYPES
    thetas: tuple[ThetaSpec, ...] = tuple(parse_theta_spec(s) for s in DEFAULT_THETA)
    mixes: tuple[MixSpec, ...] = tuple(parse_mix_spec(s) for s in DEFAULT_MIXES)
    measure: CompareSettings = CompareSettings(n_chunks=8)
    threads: int = 0  # quantization threads (0: all cores)
    progress: bool = True


@dataclass
class _File:
    """One file of the run, as written, before it is measured."""
    name: str
    kind: str  # "reference", "plain", "imatrix" (a llama.cpp type + importance matrix), "mix" (per-tensor) or "nkat"
    outtype: str
    path: Path
    report: ConvertReport | None = None
    theta: ThetaSpec | None = None
    base: str | None = None  # the imatrix row with the same type, for the speed ratio


def check_settings(model: Path, settings: FrontierSettings) -> None:
    """Every option checked before the calibration, so a typo costs a second, not the whole run."""
    layout = read_layout(model)
    for outtype in {*settings.types, PLAIN_TYPE, *(t.base for t in (*settings.thetas, *settings.mixes))}:
        resolve_outtype(outtype, layout)
    if settings.measure.n_chunks is not None and settings.measure.n_chunks < 1:
        raise InputError(f"--chunks must be at least 1, got {settings.measure.n_chunks}")
    for mix in settings.mixes:
        resolve_tensor_types(layout, mix.tensor_types)  # an unknown type or one the rows cannot hold
    for spec in settings.thetas:
        select_tensors(layout, spec.patterns)  # a pattern that matches no weight is refused here


def build_files(model: Path, reference: Path | None, calibration: Calibration, workdir: Path,
                settings: FrontierSettings) -> list[_File]:
    """Write every file of the run; only the variants that use the calibration are given it."""
    stem = model.stem
    types = list(dict.fromkeys([*settings.types, *(t.base for t in (*settings.thetas, *settings.mixes))]))
    files = [_File("reference", "reference", "reference", Path(reference or model))]

    def write(name: str, kind: str, outtype: str, label: str, theta: ThetaSpec | None = None, **options) -> _File:
        opts = ConvertOptions(input=model, output=workdir / f"{stem}.{label}.gguf", outtype=outtype,
                              reference=reference, threads=settings.threads, progress=settings.progress, **options)
        uses_calibration = opts.imatrix == "auto" or opts.resolved().theta_rank > 0
        report = convert(opts, calibration if uses_calibration else None)
        return _File(name, kind, report.outtype, Path(report.output), report, theta,
                     f"{outtype}+imatrix" if kind in ("nkat", "mix") else None)

    files.append(write(f"{PLAIN_TYPE} plain", "plain", PLAIN_TYPE, f"{PLAIN_TYPE}.plain", imatrix="none",
                       theta_rank=0))
    for outtype in types:
        files.append(write(f"{outtype}+imatrix", "imatrix", outtype, f"{outtype}.imatrix", theta_rank=0))
    for mix in settings.mixes:
        label = re.sub(r"[^A-Za-z0-9_.=-]+", "-", f"{mix.base}.imatrix.mix-" + "-".join(
            f"{k}={v}" for k, v in (*mix.tensor_types, *mix.options)))
        files.append(write(mix.name, "mix", mix.base, label, theta_rank=0, tensor_types=mix.tensor_types,
                           **dict(mix.options)))
    for spec in settings.thetas:
        label = re.sub(r"[^A-Za-z0-9_.=-]+", "-", f"{spec.base}.imatrix.theta-{spec.rank or AUTO_RANK}-{spec.weights}"
                       + "".join(f"-{k}={v}" for k, v in spec.options))
        rank = {} if spec.rank is None else {"theta_rank": spec.rank}
        files.append(write(spec.name, "nkat", spec.base, label, spec, selective_layers=spec.patterns, **rank,
                           **dict(spec.options)))
    return files


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the file holds, read from the file itself."""
    return dict(Counter(t.type.name for t in read_layout(path).tensors).most_common())


def frontier(model: Path, runtime_options: RuntimeOptions, settings: FrontierSettings = FrontierSettings(),
             reference: Path | None = None, calib_text: Path | None = None, out_dir: Path | None = None,
             plot: Path | None = None) -> dict:
    """Calibrate once, write every file (into `out_dir`, else a temporary directory), measure them all."""
    check_settings(model, settings)
    if reference is not None and not Path(reference).is_file():
        raise InputError(f"no such file: {reference}")
    if out_dir is not None:
        out_dir = make_output_dir(Path(out_dir))
    if plot is not None:
        check_writable_dir(Path(plot).resolve().parent)
    texts = {split: load_text(None, split) for split in TEXTS}
    start = time.perf_counter()
    calibration = calibrate_once(model, reference, calib_text, settings.progress)
    calibrate_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="nkat-frontier-") as tmp:
        files = build_files(model, reference, calibration, Path(out_dir or tmp), settings)
        bases = kld_base_paths(files[0].path, Path(out_dir or tmp), list(texts), settings.measure)
        measured = measure_files({f.name: f.path for f in files}, texts, runtime_options, settings.measure,
                                 bases, files[0].name, theta_off=True)
        rows = [_row(f, measured[f.name], out_dir is not None) for f in files]
    _add_gaps(rows, list(texts))
    _add_speed_ratios(rows)
    envelopes = {key: lower_envelope(rows, key) for key in texts}
    for row in rows:
        if row["kind"] == "nkat":
            row["frontier"] = {key: _against_frontier(row, envelopes[key], key) for key in texts}
    result = {
        "model": str(model), "reference": str(reference or model),
        "out_dir": str(out_dir) if out_dir else None,
        "texts": {key: {"source": t.source, "sha256": t.sha256} for key, t in texts.items()},
        "calibration": {"source": calibration.text_source, "sha256": calibration.text_sha256,
                        "tokens": calibration.tokens, "seconds": round(calibrate_seconds, 3)},
        "n_ctx": settings.measure.n_ctx, "chunks": settings.measure.n_chunks,
        "repetitions": settings.measure.repetitions, "n_prompt": settings.measure.n_prompt,
        "n_gen": settings.measure.n_gen, "device": device_name(),
        "rows": rows,
        "frontier": {key: [r["name"] for r in env] for key, env in envelopes.items()},
        "kld_base_files": {key: str(path) if out_dir else None for key, path in bases.items()},
        "default_candidate": default_candidate(rows),
        "default_candidate_by_gap": default_candidate(rows, by="gap"),
    }
    if plot is not None:
        plot_frontier(result, Path(plot))
        result["plot"] = str(plot)
    return result


def kld_base_paths(reference: Path, directory: Path, keys: list[str], settings: CompareSettings) -> dict[str, Path]:
    """Where the reference's base file of each text lives: named by the reference's hash, text and chunks, so
    a later run reuses it only for the same reference (the tokens and chunk count are checked on reuse)."""
    tag = f"{sha256_file(reference)[:16]}.ctx{settings.n_ctx}x{settings.n_chunks or 'all'}"
    return {key: directory / f"kld-base.{key}.{tag}.bin" for key in keys}


def _row(f: _File, measured: dict, kept: bool) -> dict:
    report = f.report
    return {
        "name": f.name, "kind": f.kind, "outtype": f.outtype,
        "imatrix": report.imatrix if report else None,
        "theta": None if f.theta is None else {"rank": f.theta.rank, "weights": f.theta.weights,
                                               "adapted_weights": len(report.tensors), "gamma": measured["gamma"],
                                               "options": dict(f.theta.options)},
        "base": f.base,
        "file": f.path.name, "path": str(f.path) if kept or f.kind == "reference" else None,
        "file_bytes": f.path.stat().st_size, "sha256": sha256_file(f.path),
        "tensor_types": tensor_types(f.path),
        "fallbacks": dict(Counter(report.fallbacks.values())) if report else {},
        "perplexity": measured["perplexity"],
        "kld": measured["kld"],  # per text, None for the reference itself
        **{k: measured[k] for k in ("pp_tokens_per_second", "pp_sd", "tg_tokens_per_second", "tg_sd", "pp_runs",
                                    "tg_runs")},
        # the same file with θ off, timed beside it in every round: θ's own run-time cost, with 95 % intervals
        "theta_off_tokens_per_second": measured.get("theta_off_tokens_per_second"),
        "speed_theta_vs_off": measured.get("speed_theta_vs_off"),
        "convert_seconds": report.seconds if report else None,
    }


def _add_gaps(rows: list[dict], keys: list[str]) -> None:
    """Share of the plain-Q4_0 -> reference gap each file recovers, per text (None where there is no gap)."""
    by_kind = {r["kind"]: r for r in rows if r["kind"] in ("plain", "reference")}
    for row in rows:
        row["gap_recovered"] = {}
        for key in keys:
            plain, ref = by_kind["plain"]["perplexity"][key]["ppl"], by_kind["reference"]["perplexity"][key]["ppl"]
            gap = plain - ref
            row["gap_recovered"][key] = (plain - row["perplexity"][key]["ppl"]) / gap if gap > 0 else None


def _add_speed_ratios(rows: list[dict]) -> None:
    """θ's run-time cost: an NKAT file's speed over its base type's (the same tensors, θ off), same run."""
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        base = by_name.get(row["base"]) if row["base"] else None
        row["speed_vs_base"] = None if base is None else {
            part: row[f"{part}_tokens_per_second"] / base[f"{part}_tokens_per_second"] for part in ("pp", "tg")} | {
            f"{part}_ci95": paired_ratio(row[f"{part}_runs"], base[f"{part}_runs"])["ci95"] for part in ("pp", "tg")}


def lower_envelope(rows: list[dict], key: str) -> list[dict]:
    """The llama.cpp files (types and per-tensor mixes, with the importance matrix) that no smaller-or-equal one
    beats on `key`, by size: the lower-left Pareto frontier of size against perplexity."""
    candidates = sorted((r for r in rows if r["kind"] in FRONTIER_KINDS),
                        key=lambda r: (r["file_bytes"], r["perplexity"][key]["ppl"]))
    envelope: list[dict] = []
    for row in candidates:
        if not envelope or row["perplexity"][key]["ppl"] < envelope[-1]["perplexity"][key]["ppl"]:
            envelope.append(row)
    return envelope


def _against_frontier(row: dict, envelope: list[dict], key: str) -> dict:
    """The best llama.cpp type of equal or smaller size, and whether this file beats it on `key`."""
    smaller = [r for r in envelope if r["file_bytes"] <= row["file_bytes"]]
    best = smaller[-1] if smaller else None
    ppl = row["perplexity"][key]["ppl"]
    return {"best_type": best["name"] if best else None,
            "best_ppl": best["perplexity"][key]["ppl"] if best else None,
            "beats": best is None or ppl < best["perplexity"][key]["ppl"]}


def default_candidate(rows: list[dict], budget: float = DEFAULT_BUDGET, by: str = "kld") -> str | None:
    """The NKAT row a default convert should write: at most `budget` over its base type's size, beating the
    frontier on every text, and of those the one with the lowest mean KLD on its worse text (`by="kld"`) or
    the best gap share on its worse text (`by="gap"`, the criterion before KLD). None: no such row."""
    by_name = {r["name"]: r for r in rows}
    fits = [r for r in rows if r["kind"] == "nkat" and all(v["beats"] for v in r["frontier"].values())
            and r["file_bytes"] <= (1 + budget) * by_name[r["base"]]["file_bytes"]]
    if not fits:
        return None
    if by == "kld":
        return min(fits, key=lambda r: max(v["kld"] for v in r["kld"].values()))["name"]
    worst = {r["name"]: min((g for g in r["gap_recovered"].values() if g is not None), default=float("-inf"))
             for r in fits}
    return max(fits, key=lambda r: worst[r["name"]])["name"]


def envelope_steps(envelope: list[dict], key: str, right_bytes: int) -> tuple[list[int], list[float]]:
    """The envelope as a staircase through its points in size order: flat until the next smaller perplexity,
    then straight down, on to `right_bytes` (x never decreases, y never increases)."""
    xs, ys = [], []
    for row in envelope:
        x, y = row["file_bytes"], row["perplexity"][key]["ppl"]
        if xs:
            xs.append(x)
            ys.append(ys[-1])
        xs.append(x)
        ys.append(y)
    return xs + [max(right_bytes, xs[-1])], ys + [ys[-1]]


def plot_frontier(result: dict, path: Path) -> None:
    """Perplexity against file size, one panel per text: llama.cpp's envelope as a line, the NKAT points over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 1 << 20
    rows = result["rows"]
    keys = list(result["texts"])
    fig, axes = plt.subplots(1, len(keys), figsize=(7 * len(keys), 5.5), squeeze=False)
    label_sets = []
    for ax, key in zip(axes[0], keys):
        def xy(kind: str) -> tuple[list[float], list[float], list[str]]:
            chosen = [r for r in rows if r["kind"] == kind]
            return ([r["file_bytes"] / mib for r in chosen], [r["perplexity"][key]["ppl"] for r in chosen],
                    [r["name"] for r in chosen])

        by_name = {r["name"]: r for r in rows}
        env = [by_name[n] for n in result["frontier"][key]]  # in the envelope's order: by size
        if env:
            xs, ys = envelope_steps(env, key, max(r["file_bytes"] for r in rows))
            ax.plot([x / mib for x in xs], ys, color="tab:blue", lw=1.5,
                    label="llama.cpp frontier (types and per-tensor mixes + importance matrix)")
        labels = []
        for kind, style in (("imatrix", dict(color="tab:blue", marker="o", s=28)),
                            ("mix", dict(color="tab:green", marker="^", s=36)),
                            ("plain", dict(color="grey", marker="s", s=36)),
                            ("reference", dict(color="black", marker="D", s=36)),
                            ("nkat", dict(color="tab:red", marker="*", s=110, zorder=5))):
            x, y, names = xy(kind)
            label = {"imatrix": None, "mix": "llama.cpp per-tensor mix", "plain": "plain Q4_0 (no importance matrix)",
                     "reference": "reference", "nkat": "NKAT (θ)"}[kind]
            ax.scatter(x, y, label=label, **style)
            labels += [ax.annotate(name.replace("+imatrix", ""), (xi, yi), textcoords="offset points",
                                   xytext=(4, 3), fontsize=7, color=style["color"])
                       for xi, yi, name in zip(x, y, names)]
        ax.set_title(f"{result['texts'][key]['source']} ({result['chunks']} chunks of {result['n_ctx']})", fontsize=9)
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        label_sets.append((ax, labels))
    fig.suptitle(f"{Path(result['model']).name}: perplexity against file size", fontsize=11)
    fig.tight_layout()
    for ax, labels in label_sets:  # after the layout: placement works on the final pixel positions
        place_labels(ax, labels)
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _no_kld(row: dict) -> str:
    return "reference" if row["kind"] == "reference" else "n/a"


def format_frontier(result: dict) -> str:
    """One line per file: size, perplexity, gap share, mean KLD and same-top share on each text, speed;
    then the envelope."""
    keys = list(result["texts"])
    mib = 1 << 20
    lines = [f"model {result['model']}; reference {result['reference']}; calibration "
             f"{result['calibration']['source']} ({result['calibration']['tokens']} tokens); "
             f"{result['chunks']} chunks of {result['n_ctx']} per text; {result['repetitions']} interleaved "
             f"speed rounds on {result['device']}"]
    header = f"{'file':34}{'MiB':>8}" + "".join(f"{key[:10] + ' ppl':>16}{'gap':>8}{'KLD':>9}{'top %':>7}"
                                               for key in keys)
    lines.append(header + f"{'pp tok/s':>10}{'tg tok/s':>10}{'tg θ/off (95 %)':>16}  beats frontier")
    for r in result["rows"]:
        kld = r.get("kld") or {}
        cells = "".join(f"{r['perplexity'][k]['ppl']:>16.4f}"
                        + (f"{100 * r['gap_recovered'][k]:>7.1f}%" if r["gap_recovered"][k] is not None
                           else f"{'n/a':>8}")
                        + (f"{kld[k]['kld']:>9.4f}" if kld.get(k) else f"{_no_kld(r)[:3]:>9}")
                        + (f"{100 * kld[k]['same_top']:>7.1f}" if kld.get(k) else f"{'':>7}") for k in keys)
        off = r.get("speed_theta_vs_off")
        ratio = f"{off['tg']['ratio']:>6.3f}±{off['tg']['halfwidth']:.3f}" if off else f"{'':>12}"
        beats = ("  " + ", ".join(f"{k}: {'yes' if r['frontier'][k]['beats'] else 'no'}" for k in keys)
                 if "frontier" in r else "")
        lines.append(f"{r['name']:34}{r['file_bytes'] / mib:>8.2f}{cells}{r['pp_tokens_per_second']:>10.1f}"
                     f"{r['tg_tokens_per_second']:>10.1f}    {ratio}{beats}")
    for key in keys:
        lines.append(f"frontier on {key}: " + " < ".join(result["frontier"][key]))
    lines.append(f"default candidate (<= +{100 * DEFAULT_BUDGET:g} % over its base, beats the frontier on every text, "
                 f"lowest worse-text mean KLD): {result['default_candidate'] or 'none'}; by the worse-text gap share: "
                 f"{result.get('default_candidate_by_gap') or 'none'}")
    fallbacks = {r["name"]: r["fallbacks"] for r in result["rows"] if r["fallbacks"]}
    for name, counts in fallbacks.items():
        lines.append(f"llama.cpp fallbacks in {name}: " + ", ".join(f"{n}× {k}" for k, n in counts.items()))
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The table README and BENCHMARKS.md quote, from a `frontier --json` result (tools/frontier_table.py)."""
    mib = 1 << 20
    keys = list(result["texts"])
    head = ["file", "MiB", *(f"{k} ppl (gap)" for k in keys), *(f"{k} KLD [95 % CI] (99 %, same top)" for k in keys),
            "pp tok/s", "tg tok/s", "tg θ/off [95 % CI]", "pp θ/off [95 % CI]", "beats the frontier"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(result["rows"], key=lambda r: (r["kind"] == "nkat", r["file_bytes"])):
        cells = [r["name"], f"{r['file_bytes'] / mib:.2f}"]
        for k in keys:
            gap = r["gap_recovered"][k]
            cells.append(f"{r['perplexity'][k]['ppl']:.4f} ({'n/a' if gap is None else f'{100 * gap:.1f} %'})")
        for k in keys:
            kld = (r.get("kld") or {}).get(k)
            cells.append(_no_kld(r) if kld is None else
                         f"{kld['kld']:.4f} [{kld['kld_ci95'][0]:.4f}, {kld['kld_ci95'][1]:.4f}] "
                         f"({kld['kld_percentiles']['99.0']:.3f}, {100 * kld['same_top']:.1f} %)")
        off = r.get("speed_theta_vs_off")
        cells += [f"{r['pp_tokens_per_second']:.0f}", f"{r['tg_tokens_per_second']:.0f}",
                  *(f"{off[p]['ratio']:.3f} [{off[p]['ci95'][0]:.3f}, {off[p]['ci95'][1]:.3f}]" if off else ""
                    for p in ("tg", "pp"))]
        verdicts = [f"{k}: {'yes' if v['beats'] else 'no'} (vs {v['best_type']})"
                    for k, v in r.get("frontier", {}).items()]
        cells.append(", ".join(verdicts))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nDefault candidate (at most +{100 * DEFAULT_BUDGET:g} % over its base type, beats the frontier on "
                 f"every text, lowest mean KLD on its worse text): {result.get('default_candidate') or 'none'}; "
                 f"by the best gap share on its worse text: {result.get('default_candidate_by_gap') or 'none'}")
    return "\n".join(lines)
