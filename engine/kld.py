"""KL divergence from a reference, as `llama-perplexity --kl-divergence-base` / `--kl-divergence` compute it.

Two passes, as stock runs them: the reference's perplexity pass also stores its log-probabilities of every
scored token in llama-perplexity's own base file (nkat_gguf/format/kld_base.py); a second model's pass
over the file's tokens compares its distributions with the stored ones (nkat_gguf/math/kld.py). Either
side may be stock llama.cpp: our base file is the file stock writes and reads. Both ride on
engine/perplexity.py's one pass (its `on_chunk` hook), one chunk in memory at a time, the rows split over
the context's threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from nkat_gguf.engine.perplexity import PerplexityResult, RowBlocks, chunk_count, perplexity
from nkat_gguf.errors import InputError
from nkat_gguf.format.kld_base import BaseFile, base_writer, decode_rows, encode_rows, scored_rows
from nkat_gguf.math.kld import KldSummary, TokenStats, summarize, token_stats

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
    """The reference's perplexity pass, writing its log-probabilities to `path` (atomically) on the way."""
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
    reference. `tokens`, when given (this model's tokenization of the text), must be the file's tokens."""
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
