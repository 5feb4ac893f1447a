"""KL divergence from a KLD base model, as `llama-perplexity --kl-divergence-base` / `--kl-divergence` compute it.

Two passes, as stock runs them: the KLD base model's perplexity pass also stores its log-probabilities of every
scored token in llama-perplexity's own base file (nkat_gguf/format/kld_base.py); a second model's pass
over the file's tokens compares its distributions with the stored ones (nkat_gguf/math/kld.py). Either
side may be stock llama.cpp: our base file is the file stock writes and reads. Both ride on
engine/measure/perplexity.py's one pass (its `on_chunk` hook), one chunk in memory at a time, the rows split over
the context's threads.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from nkat_gguf.engine.measure.perplexity import PerplexityResult, RowBlocks, chunk_count, perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.format.atomic import work_dir
from nkat_gguf.format.kld_base import BaseFile, base_writer, decode_rows, encode_rows, scored_rows
from nkat_gguf.math.kld import KldSummary, TokenStats, summarize, token_stats
from nkat_gguf.texts import Text

BLOCK_ROWS = 16  # rows per thread task: a few (16, n_vocab) float32 temporaries each


@dataclass(frozen=True)
class KldResult:
    perplexity: PerplexityResult  # this model's, over the base file's tokens
    kld: KldSummary
    base: str  # the base file compared against

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity.as_dict(), "kld": self.kld.as_dict(), "base": self.base}


def _n_vocab(llm: llama_cpp.Llama) -> int:
    return llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))


def write_base(llm: llama_cpp.Llama, tokens: list[int], path: Path, n_ctx: int = 512, n_chunks: int | None = None,
               progress: bool = True) -> PerplexityResult:
    """The KLD base model's perplexity pass, writing its log-probabilities to `path` (atomically) on the way."""
    n_chunks = chunk_count(len(tokens), n_ctx, n_chunks)
    n_vocab = _n_vocab(llm)
    rows = RowBlocks(llama_cpp.llama_n_threads_batch(llm.ctx), scored_rows(n_ctx), BLOCK_ROWS)
    try:
        with base_writer(path, n_ctx, n_vocab, np.asarray(tokens[: n_chunks * n_ctx])) as writer:
            return perplexity(llm, tokens, n_ctx, n_chunks, progress,
                              on_chunk=lambda logits, _: writer.write_encoded(np.concatenate(
                                  rows.map(encode_rows, logits))))
    finally:
        rows.close()


def check_base(base: BaseFile, llm: llama_cpp.Llama, tokens: list[int] | None = None) -> None:
    """One clear line when a base file cannot be compared with this model (and, if given, this text)."""
    h = base.header
    if h.n_vocab != _n_vocab(llm):
        raise InputError(f"{base.path}: written from a model with a vocabulary of {h.n_vocab} tokens, this model has "
                         f"{_n_vocab(llm)}: a base file compares only models of one tokenizer")
    if h.n_ctx > llama_cpp.llama_n_ctx(llm.ctx):
        raise InputError(f"{base.path} was written with n_ctx={h.n_ctx}, more than this model's loaded context "
                         f"({llama_cpp.llama_n_ctx(llm.ctx)}): load it with --ctx {h.n_ctx}")
    if tokens is not None:
        mine = np.asarray(tokens[: base.tokens.size], dtype=np.int32)
        if mine.size < base.tokens.size:
            raise InputError(f"{base.path} holds {base.tokens.size} tokens, the text tokenizes to only {len(tokens)}: "
                             "the base file was written from another text")
        if (diff := np.flatnonzero(mine != base.tokens)).size:
            raise InputError(f"{base.path}: its tokens differ from this text's from token {int(diff[0])} on: the base "
                             "file was written from another text or tokenizer")


def base_matches(path: Path, llm: llama_cpp.Llama, tokens: list[int], n_ctx: int, n_chunks: int | None) -> bool:
    """Whether `path` is a complete base file of exactly these tokens and chunks (a cache worth reusing)."""
    try:
        with BaseFile(path) as base:
            check_base(base, llm, tokens)
            return (base.header.n_ctx == n_ctx
                    and base.header.n_chunk == chunk_count(len(tokens), n_ctx, n_chunks))
    except (InputError, OSError):
        return False


def kl_divergence(llm: llama_cpp.Llama, path: Path, progress: bool = True,
                  tokens: list[int] | None = None) -> KldResult:
    """This model's pass over a base file's tokens: its perplexity and its KL divergence from the stored
    base model's. `tokens`, when given (this model's tokenization of the text), must be the file's tokens."""
    with BaseFile(path) as base:
        check_base(base, llm, tokens)
        h = base.header
        parts: list[TokenStats] = []
        chunks_seen = [0]
        rows = RowBlocks(llama_cpp.llama_n_threads_batch(llm.ctx), scored_rows(h.n_ctx), BLOCK_ROWS)

        def compare(logits: np.ndarray, base_rows: np.ndarray, targets: np.ndarray) -> TokenStats:
            return token_stats(logits, decode_rows(base_rows, h.n_vocab), targets)

        def on_chunk(logits: np.ndarray, targets: np.ndarray) -> None:
            parts.extend(rows.map(compare, logits, base.chunk_rows(chunks_seen[0]), targets))
            chunks_seen[0] += 1

        try:
            result = perplexity(llm, base.tokens.tolist(), h.n_ctx, h.n_chunk, progress, on_chunk=on_chunk)
        finally:
            rows.close()
    return KldResult(result, summarize(TokenStats.concatenate(parts)), str(path))


def measure_model(model: Path, options: RuntimeOptions, theta: bool, gamma: float | None, text: Text | None,
                  n_ctx: int | None, n_chunks: int | None, base: Path | None = None, compare_with_base: bool = False,
                  base_model: Path | None = None, progress: bool = True) -> dict:
    """The `perplexity` command's modes, as llama-perplexity's flags combine:

    - no base, no base model: perplexity only;
    - `base` alone (--kl-divergence-base): this model is the KLD base model and writes `base`;
    - `base` and `compare_with_base` (--kl-divergence): this model against `base`, over the file's tokens
      (and n_ctx, and chunks); a `text`, if given, must tokenize to them;
    - `base_model` (--kld-base-model): the base model's pass writes `base` (a temporary file when None), then
      this model is compared with it, all in this process.
    θ off unless `theta`; then at `gamma`, None for the file's. `options.n_ctx` must cover the chunk length (`base_context` tells it for a base file).
    """
    if compare_with_base and base_model is not None:
        raise InputError("--kld-base-model computes the base itself: drop --kl-divergence (which reads a base file)")
    if compare_with_base and base is None:
        raise InputError("--kl-divergence compares with a base file: give it with --kl-divergence-base FILE")
    if compare_with_base and n_chunks is not None:
        raise InputError("--chunks does not apply with --kl-divergence: every chunk of the base file is scored")
    kept = base  # the base file the user named (a temporary one is not reported)
    with contextlib.ExitStack() as stack:
        if base_model is not None:
            if text is None:
                raise InputError("--kld-base-model needs the text to score")  # the CLI always passes one
            base = base or stack.enter_context(work_dir(Path(tempfile.gettempdir()), "kld")) / "base-model.kld"
            with NkatRuntime(base_model, options) as base_rt:
                write_base(base_rt.llm, tokenize_text(base_rt.llm, text.content), base, n_ctx or 512, n_chunks,
                           progress)
        with NkatRuntime(model, options) as rt:
            rt.set_gamma(rt.resolve_gamma(gamma) if theta else None)
            out = {"model": str(model), "theta_enabled": rt.gamma is not None, "gamma": rt.gamma,
                   "text": text.source if text else f"the tokens of {base}", "kl_divergence_base": None, "kld": None}
            tokens = tokenize_text(rt.llm, text.content) if text is not None else None
            if compare_with_base or base_model is not None:
                result = kl_divergence(rt.llm, base, progress, tokens)
                out.update(result.perplexity.as_dict(), kld=result.kld.as_dict(),
                           kl_divergence_base=str(kept) if kept else None)
            elif base is not None:
                out.update(write_base(rt.llm, tokens, base, n_ctx or 512, n_chunks, progress).as_dict(),
                           kl_divergence_base=str(base))
            else:
                out.update(perplexity(rt.llm, tokens, n_ctx or 512, n_chunks, progress).as_dict())
    if base_model is not None:
        out["kld_base_model"] = str(base_model)
    return out


def base_context(base: Path, n_ctx: int | None) -> int:
    """The chunk length a comparison with `base` runs at: the file's (an explicit, different n_ctx is refused)."""
    with BaseFile(base) as f:
        if n_ctx is not None and n_ctx != f.header.n_ctx:
            raise InputError(f"{base} was written with n_ctx={f.header.n_ctx}: --ctx {n_ctx} cannot compare with it "
                             "(leave --ctx out)")
        return f.header.n_ctx


def format_kld(kld: dict) -> str:
    """The KL-divergence lines of `llama-perplexity --kl-divergence`'s summary, same names and order."""
    p = kld["kld_percentiles"]
    d = kld["p_diff_percentiles"]
    return "\n".join([
        f"Mean PPL(Q)                   : {kld['ppl']:10.6f} ± {kld['ppl_stderr']:10.6f}",
        f"Mean PPL(base)                : {kld['ppl_base']:10.6f} ± {kld['ppl_base_stderr']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * kld['ppl_correlation']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {kld['ln_ppl_ratio']:10.6f} ± {kld['ln_ppl_ratio_stderr']:10.6f}",
        f"Mean    KLD: {kld['kld']:10.6f} ± {kld['kld_stderr']:10.6f}  "
        f"(95 % interval {kld['kld_ci95'][0]:.6f} … {kld['kld_ci95'][1]:.6f}, {kld['tokens']} tokens)",
        f"Maximum KLD: {kld['kld_max']:10.6f}",
        *(f"{k:>4}%   KLD: {p[k]:10.6f}" for k in ("99.9", "99.0", "95.0", "90.0")),
        f"Median  KLD: {kld['kld_median']:10.6f}",
        *(f"{k:>4}%   KLD: {p[k]:10.6f}" for k in ("10.0", "5.0", "1.0", "0.1")),
        f"Minimum KLD: {kld['kld_min']:10.6f}",
        f"Mean    Δp: {100 * kld['p_diff_mean']:6.3f} ± {100 * kld['p_diff_stderr']:5.3f} %",
        f"Maximum Δp: {100 * kld['p_diff_max']:6.3f}%",
        *(f"{k:>4}%   Δp: {100 * d[k]:6.3f}%" for k in ("99.9", "99.0", "95.0", "90.0", "75.0")),
        f"Median  Δp: {100 * kld['p_diff_median']:6.3f}%",
        *(f"{k:>4}%   Δp: {100 * d[k]:6.3f}%" for k in ("25.0", "10.0", "5.0", "1.0", "0.1")),
        f"Minimum Δp: {100 * kld['p_diff_min']:6.3f}%",
        f"RMS Δp    : {100 * kld['p_diff_rms']:6.3f} ± {100 * kld['p_diff_rms_stderr']:5.3f} %",
        f"Same top p: {100 * kld['same_top']:6.3f} ± {100 * kld['same_top_stderr']:5.3f} %",
    ])
