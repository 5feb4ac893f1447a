"""SO8T quality control: does the baked model compute what the model before baking computed?

Used by `convert --so8t` before quantizing (a failed check means nothing is written) and by
`nkat-gguf qc bake` on any two GGUFs. Both sides read the same fixed short text (the first
QC_TOKENS tokens of the evaluation split) with F32 weights; llama.cpp runs with an F32 KV cache,
because the default F16 cache alone moves an exact rotation's logits by about 2.5e-2 (5e-5 in F32).

Checks and gates (the issue's targets for function-preserving rotations):
  max |z_pre − z_post| over every position and vocabulary entry   ≤ 1e-3
  mean over positions of KL(p_pre ‖ p_post)                        ≤ 1e-6   (max KL, top-1 reported)
  every rotation block: ‖RᵀR − I‖_F ≤ 1e-4 and det > 0

Trained gates (`file:`): "pre" is the gated model W·(R·x) run by the PyTorch forward with R applied
online, "post" the baked W' = W·R in llama.cpp, so the comparison spans two implementations. Measured
on the default model with the same F32 weights and no gate, reference vs llama.cpp differ by max |Δz|
8.6e-5 and mean KL 1.5e-11 over 128 tokens: more than ten times inside the gates, so they stay the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGUFValueType

from nkat_gguf.engine.forward.llama import LlamaForward
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions, check_loadable
from nkat_gguf.engine.llama.vocab import tokenize
from nkat_gguf.errors import InputError, NkatError
from nkat_gguf.format import nkat
from nkat_gguf.format.atomic import atomic_output, check_writable_dir
from nkat_gguf.format.gguf_file import FLOAT_TYPES, read_layout, typed_value
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.so8t.rotations import BLOCK, ORTHOGONALITY_TOLERANCE
from nkat_gguf.texts import Text, load_text

QC_TOKENS = 128
MAX_ABS_DZ = 1e-3
MAX_MEAN_KL = 1e-6
REPORT_NAME = "so8t-qc"  # --report DIR gets so8t-qc.json and so8t-qc.md


class QCFailed(NkatError):
    """A QC gate was missed; the message names every missed check and by how much."""


@dataclass(frozen=True)
class QCResult:
    mode: str  # "hadamard", "random", "file", ... or "gguf" for two given files
    pre: str  # what computed the logits before baking
    text: str
    text_sha256: str
    tokens: int
    max_abs_dz: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    max_orthogonality_error: float | None  # None: the rotation blocks are unknown
    min_det: float | None
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        """The missed checks on one line."""
        return "; ".join(self.failures)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failures": list(self.failures), "passed": self.passed,
                "gates": {"max_abs_dz": MAX_ABS_DZ, "mean_kl": MAX_MEAN_KL,
                          "max_orthogonality_error": ORTHOGONALITY_TOLERANCE, "min_det": 0.0}}

    def metadata(self, forced: bool) -> dict[str, Any]:
        """nkat.so8t.qc.* keys for the output file (orthogonality and det are nkat.so8t.* already)."""
        fields: dict[str, Any] = {
            "passed": self.passed, "forced": forced, "max_abs_dz": self.max_abs_dz, "mean_kl": self.mean_kl,
            "max_kl": self.max_kl, "top1_agreement": self.top1_agreement, "tokens": self.tokens, "pre": self.pre,
            "text_sha256": self.text_sha256,
        }
        if self.failures:
            fields["failures"] = self.summary()
        return {nkat.SO8T_QC_PREFIX + name: value for name, value in fields.items()}


def qc_text(path: Path | None = None) -> Text:
    return load_text(path, "evaluation")


def qc_tokens(model: Path, text: Text) -> list[int]:
    """The first QC_TOKENS tokens of the text, as the model's own tokenizer gives them."""
    tokens = tokenize(model, text.content)[:QC_TOKENS]
    if not tokens:
        raise InputError(f"QC text {text.source} gives no tokens")
    return tokens


def llama_logits(model: Path, tokens: Sequence[int]) -> np.ndarray:
    """(T, V) float64 logits from llama.cpp, F32 KV cache, theta (if the file has one) off."""
    options = RuntimeOptions(n_ctx=len(tokens), n_batch=len(tokens), n_gpu_layers=0, f32_kv_cache=True,
                             logits_all=True)
    with NkatRuntime(model, options) as runtime:
        runtime.set_gamma(None)
        runtime.llm.eval(list(tokens))
        return np.array(runtime.llm.scores[: len(tokens)], dtype=np.float64)


def forward_logits(source: TensorSource, tokens: Sequence[int], gates: Mapping[str, np.ndarray]) -> np.ndarray:
    """(T, V) float64 logits of the gated model: the PyTorch forward computes W·(R·x) for each gate."""
    hooks = {name: _rotate_input(blocks) for name, blocks in gates.items()}
    return LlamaForward(source, input_hooks=hooks).logits([list(tokens)])[0].astype(np.float64)


def _rotate_input(blocks: np.ndarray):
    """x (N, n) -> R·x per row, R = diag(R_1 … R_{n/8}): (R·x)[8k+i] = Σ_j R_k[i, j] x[8k+j]."""
    rotation = torch.from_numpy(np.asarray(blocks, dtype=np.float64))

    def hook(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1, BLOCK)  # (N, n/8, 8)
        return torch.einsum("mij,nmj->nmi", rotation.to(x.dtype), rows).reshape(x.shape)

    return hook


def judge(mode: str, pre: str, text: Text, z_pre: np.ndarray, z_post: np.ndarray,
          max_orthogonality_error: float | None = None, min_det: float | None = None) -> QCResult:
    """Every figure of the comparison, and the gates it misses."""
    if z_pre.shape != z_post.shape:
        raise InputError(f"logits have shapes {z_pre.shape} and {z_post.shape}: not the same vocabulary")
    log_pre = torch.log_softmax(torch.from_numpy(z_pre), -1)
    log_post = torch.log_softmax(torch.from_numpy(z_post), -1)
    kl = (log_pre.exp() * (log_pre - log_post)).sum(-1).numpy()  # (T,)
    figures = {"max_abs_dz": float(np.abs(z_pre - z_post).max()), "mean_kl": float(kl.mean()),
               "max_kl": float(kl.max()), "top1_agreement": float((z_pre.argmax(-1) == z_post.argmax(-1)).mean())}
    failures = [f"{label} {value:.3g} > {gate:g}" for label, value, gate in (
        ("mean KL", figures["mean_kl"], MAX_MEAN_KL),
        ("max |Δz|", figures["max_abs_dz"], MAX_ABS_DZ),
        ("max ‖RᵀR − I‖_F", max_orthogonality_error, ORTHOGONALITY_TOLERANCE),
    ) if value is not None and not value <= gate]  # `not <=` so that NaN fails too
    if min_det is not None and not min_det > 0:
        failures.append(f"min det {min_det:.3g} <= 0 (a reflection)")
    return QCResult(mode, pre, text.source, text.sha256, len(z_pre), **figures,
                    max_orthogonality_error=max_orthogonality_error, min_det=min_det, failures=tuple(failures))


def compare_ggufs(pre: Path, post: Path, text: Text) -> QCResult:
    """`qc bake`: both files in llama.cpp on the pre file's tokens; block figures from post's nkat.so8t.* keys."""
    for path in (pre, post):
        check_loadable(path)  # llama.cpp's own reason for a bad file, before any tokenizing
    tokens = qc_tokens(pre, text)
    layout = read_layout(post)
    return judge(typed_value(layout, nkat.SO8T_MODE, (GGUFValueType.STRING,)) or "gguf", f"llama.cpp: {pre.name}",
                 text, llama_logits(pre, tokens), llama_logits(post, tokens),
                 typed_value(layout, nkat.SO8T_MAX_ORTHOGONALITY_ERROR, FLOAT_TYPES),
                 typed_value(layout, nkat.SO8T_MIN_DET, FLOAT_TYPES))


def check_report_dir(directory: Path) -> None:
    """Before any long work: DIR, or the nearest part of it that exists, must be writable."""
    existing = next(p for p in (directory.resolve(), *directory.resolve().parents) if p.exists())
    check_writable_dir(existing)


def write_report(directory: Path, report: Mapping[str, Any]) -> list[Path]:
    """so8t-qc.json (the whole `report`) and so8t-qc.md (its `so8t` part as tables), each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, content in (("json", json.dumps(report, indent=2, default=str) + "\n"),
                            ("md", report_markdown(report))):
        path = directory / f"{REPORT_NAME}.{suffix}"
        with atomic_output(path) as tmp:
            tmp.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def report_markdown(report: Mapping[str, Any]) -> str:
    so8t, qc = report["so8t"], report["so8t"]["qc"]
    verdict = "passed" if qc["passed"] else f"**FAILED** ({'; '.join(qc['failures'])})"
    if so8t["forced"]:
        verdict += ", written anyway (--force)"
    gates = qc["gates"]
    rows = [("max \\|z_pre − z_post\\|", qc["max_abs_dz"], f"≤ {gates['max_abs_dz']:g}"),
            ("mean KL(p_pre ‖ p_post)", qc["mean_kl"], f"≤ {gates['mean_kl']:g}"),
            ("max KL(p_pre ‖ p_post)", qc["max_kl"], ""),
            ("top-1 agreement", qc["top1_agreement"], ""),
            ("max ‖RᵀR − I‖_F", qc["max_orthogonality_error"], f"≤ {gates['max_orthogonality_error']:g}"),
            ("min det R", qc["min_det"], "> 0")]
    lines = [f"# SO8T QC: {Path(report['output']).name}", "",
             f"- input: `{report['input']}`", f"- output: `{report['output']}` ({report['outtype']})",
             f"- rotation: {so8t['description']}",
             f"- text: {qc['text']} (first {qc['tokens']} tokens, sha256 {qc['text_sha256'][:12]}…)",
             f"- pre: {qc['pre']}; post: the baked F32 model in llama.cpp; F32 KV cache",
             f"- verdict: {verdict}", "",
             "| check | value | gate |", "|---|---|---|"]
    lines += [f"| {name} | {'n/a' if value is None else format(value, '.3g')} | {gate} |" for name, value, gate in rows]
    return "\n".join(lines) + "\n"
