"""Learned θ against closed-form θ at equal θ bytes and weights: mean KLD on both evaluation texts, θ on and off.

One calibration is shared by every convert (as `frontier` and `quality` share theirs). The default convert's file
(the allocation's types, θ weights and ranks) is written once per `--modes` entry: `none` is closed-form θ, `block`
and `model` train it further (`convert --theta-train`), starting from that closed form and keeping its weights and
ranks, so the files differ only in θ's factors (checked: same tensor data, same ranks, same θ bytes). The
reference's log-probabilities are written once per text (llama-perplexity's base file, engine/measure/kld.py);
every file is then compared with them with θ at its γ and with θ off (the same file: the runtime switches θ off).
Texts: the pydoc evaluation split and the licence texts; training sees the calibration text only.

Per file: convert and training seconds, peak resident memory of that convert (the peak is reset before each
one where Linux allows it, `peak_reset`), file size, θ bytes, and per text the mean KLD with θ off and on with
their 95 % intervals, θ's share (1 − on/off) and, for learned θ, its gain over closed-form θ (1 − on/on_closed).
Progress goes to stderr, the JSON to stdout:

    .venv/bin/python benchmarks/theta_train.py --chunks 8 > theta_train.json
    .venv/bin/python benchmarks/theta_train.py --input off-grid-f32.gguf --modes none,block --steps 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.convert.theta_train import TrainSettings, check_train_options
from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.engine.measure.kld import kl_divergence, write_base
from nkat_gguf.engine.measure.perplexity import tokenize_text
from nkat_gguf.errors import InputError
from nkat_gguf.evaluate.quality import calibrate_once
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.nkat import read_theta
from nkat_gguf.math.allocation import MIB
from nkat_gguf.math.limits import DEFAULT_TRAIN_LR, DEFAULT_TRAIN_STEPS, DEFAULT_TRAIN_TOKENS, THETA_TRAINS
from nkat_gguf.texts import Text, load_text

TEXTS = ("evaluation", "licenses")
N_CTX = 512


def reset_peak() -> bool:
    """Reset the process's peak resident memory to its current size (Linux ≥ 4.0: clear_refs 5), so that
    getrusage's ru_maxrss, which convert reports, is the next convert's own peak. False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tensor_data_sha256(path: Path) -> str:
    """Digest of the tensor data section: equal for files that differ only in metadata (θ)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(read_layout(path).data_offset)
        for block in iter(lambda: fh.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def kld_bases(reference: Path, texts: dict[str, Text], options: RuntimeOptions, chunks: int,
              directory: Path) -> dict[str, Path]:
    """The reference's base file per text, written once: what every file's KLD is measured against."""
    bases = {}
    with NkatRuntime(reference, options) as rt:
        rt.set_gamma(None)  # a reference that carries θ is measured as its plain weights
        for key, text in texts.items():
            bases[key] = directory / f"kld-base.{key}.bin"
            write_base(rt.llm, tokenize_text(rt.llm, text.content), bases[key], N_CTX, chunks, progress=False)
            print(f"reference base file for {key} written", file=sys.stderr, flush=True)
    return bases


def measure_kld(path: Path, texts: dict[str, Text], bases: dict[str, Path], options: RuntimeOptions) -> dict:
    """Per text, the file's mean KLD from the reference with θ off and with θ at its γ, and θ's share."""
    out = {}
    with NkatRuntime(path, options) as rt:
        gamma = rt.resolve_gamma()
        for key, text in texts.items():
            tokens = tokenize_text(rt.llm, text.content)
            row = {}
            for state, g in (("theta_off", None), ("theta_on", gamma)):
                rt.set_gamma(g)
                kld = kl_divergence(rt.llm, bases[key], False, tokens).kld.as_dict()
                row[state] = {k: kld[k] for k in ("kld", "kld_ci95", "same_top")}
                print(f"{path.name} {key} {state}: KLD {kld['kld']:.5f} [{kld['kld_ci95'][0]:.5f}, "
                      f"{kld['kld_ci95'][1]:.5f}]", file=sys.stderr, flush=True)
            row["theta_share"] = 1 - row["theta_on"]["kld"] / row["theta_off"]["kld"]
            out[key] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=None, help="the model to convert (default: the embedded model)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="convert's --reference and the KLD reference (default: the input)")
    parser.add_argument("--modes", default=",".join(THETA_TRAINS),
                        help="comma list of none, block, model; none (closed form) is always measured")
    parser.add_argument("--steps", type=int, default=DEFAULT_TRAIN_STEPS, help="--theta-train-steps")
    parser.add_argument("--lr", type=float, default=DEFAULT_TRAIN_LR, help="--theta-train-lr")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TRAIN_TOKENS, help="--theta-train-tokens")
    parser.add_argument("--seed", type=int, default=0, help="the training's seed")
    parser.add_argument("--calib-text", type=Path, default=None, help="convert's --calib-text")
    parser.add_argument("--chunks", type=int, default=8, help="chunks of 512 tokens per evaluation text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temporary directory)")
    args = parser.parse_args()
    modes = list(dict.fromkeys(["none", *args.modes.split(",")]))
    if unknown := [m for m in modes if m not in THETA_TRAINS]:
        parser.error(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(THETA_TRAINS)})")

    model = args.input or default_model_path()
    reference = args.reference or model
    try:  # a bad training option fails now, not after the calibration
        for mode in modes:
            check_train_options(TrainSettings(mode, args.steps, args.lr, args.tokens, args.seed), read_layout(model),
                                wants_theta=True)
    except InputError as exc:
        parser.error(str(exc))
    options = RuntimeOptions(n_ctx=N_CTX, n_batch=N_CTX, n_threads=args.threads)
    texts = {key: load_text(None, key) for key in TEXTS}
    with tempfile.TemporaryDirectory(prefix="nkat-theta-train-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("calibrating (shared by every convert)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        calibration = calibrate_once(model, args.reference, args.calib_text, progress=False)
        calibrate_seconds = time.perf_counter() - start
        bases = kld_bases(reference, texts, options, args.chunks, work)
        rows: dict[str, dict] = {}
        for mode in modes:
            out = work / f"{model.stem}.theta-{mode}.gguf"
            peak_reset = reset_peak()
            report = convert(ConvertOptions(
                input=model, output=out, reference=args.reference, calib_text=args.calib_text, threads=args.threads,
                progress=False, theta_train=mode, theta_train_steps=args.steps,
                theta_train_lr=args.lr, theta_train_tokens=args.tokens, theta_train_seed=args.seed), calibration)
            train = report.theta_train or {}
            print(f"convert {mode}: {report.seconds['total']:.1f} s (training {train.get('seconds', 0):.1f} s), "
                  f"{report.output_bytes / MIB:.2f} MiB", file=sys.stderr, flush=True)
            theta = read_theta(out)
            rows[mode] = {
                "file": str(out) if args.work else out.name, "file_mib": report.output_bytes / MIB,
                "theta_bytes": report.theta_metadata_bytes, "theta_weights": len(theta.tensors),
                "ranks": theta.ranks, "tensor_data_sha256": tensor_data_sha256(out),
                "convert_seconds": report.seconds["total"], "seconds": report.seconds,
                "training_seconds": train.get("seconds", 0.0),
                "peak_resident_bytes": report.peak_resident_bytes, "peak_reset": peak_reset,
                "training": train or None, "types": report.types,
                "kld": measure_kld(out, texts, bases, options)}
    closed = rows["none"]
    for mode, row in rows.items():
        row["same_tensors_and_theta_layout_as_closed_form"] = all(
            row[k] == closed[k] for k in ("tensor_data_sha256", "ranks", "theta_bytes"))
        if not row["same_tensors_and_theta_layout_as_closed_form"]:
            print(f"warning: {mode}'s file differs from the closed form's beyond θ's factors", file=sys.stderr)
        if mode != "none":
            row["gain_over_closed_form"] = {key: 1 - row["kld"][key]["theta_on"]["kld"]
                                            / closed["kld"][key]["theta_on"]["kld"] for key in TEXTS}
    print(json.dumps({"model": str(model), "reference": str(reference), "chunks": args.chunks, "n_ctx": N_CTX,
                      "threads": args.threads, "texts": {k: {"source": t.source, "sha256": t.sha256}
                                                         for k, t in texts.items()},
                      "calibration": {"source": calibration.text_source, "sha256": calibration.text_sha256,
                                      "tokens": calibration.tokens,
                                      # seconds of this run's pass: near 0 when the calibration cache held it
                                      "seconds": round(calibrate_seconds, 3)},
                      "training": {"steps": args.steps, "lr": args.lr, "tokens": args.tokens, "seed": args.seed},
                      "command": "python benchmarks/theta_train.py " + " ".join(sys.argv[1:]), "rows": rows},
                     indent=1))


if __name__ == "__main__":
    main()
