"""Perplexity exactly as llama.cpp's `llama-perplexity` computes it, on an already-loaded model.

Method (tools/perplexity/perplexity.cpp): tokenize the whole text once; cut it into chunks of
n_ctx tokens; when the vocabulary asks for BOS, the first token of every chunk is replaced by BOS;
the KV cache is cleared before every chunk; only positions n_ctx/2 … n_ctx-2 are scored (the logit at
position j predicts token j+1), so every scored token has at least n_ctx/2 tokens of context.
PPL = exp(mean NLL); the ± is llama-perplexity's: ppl * sqrt(var(NLL) / (count - 1)).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import llama_cpp
import numpy as np
from tqdm import tqdm

from nkat_gguf.errors import InputError, UnsupportedModelError
from nkat_gguf.math.limits import MIN_N_CTX

# Called once per chunk with the scored logits (n_scored, vocab) -- a view of llama.cpp's buffer, valid only
# during the call: copy what must outlive it -- and the target token of each row.
ChunkHook = Callable[[np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_stderr: float  # llama-perplexity's "+/-"
    n_chunks: int
    n_ctx: int
    tokens_scored: int
    seconds: float
    tokens_per_second: float  # tokens evaluated (n_chunks * n_ctx) per second, scoring included

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _vocab(llm: llama_cpp.Llama) -> llama_cpp.llama_vocab_p:
    return llama_cpp.llama_model_get_vocab(llm.model)


def tokenize_text(llm: llama_cpp.Llama, text: str) -> list[int]:
    """Tokens as llama-perplexity gets them: special tokens added only as the vocabulary asks.

    `add_bos=True` here is llama.cpp's `add_special`: BOS is prepended only if the model's
    `tokenizer.ggml.add_bos_token` says so (SmolLM2's says false).
    """
    if llama_cpp.llama_vocab_get_add_eos(_vocab(llm)):
        raise UnsupportedModelError("model appends EOS when tokenizing; llama-perplexity refuses such models too")
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def _check_context(llm: llama_cpp.Llama, n_ctx: int) -> None:
    if n_ctx < MIN_N_CTX:
        raise InputError(f"n_ctx must be at least {MIN_N_CTX}, got {n_ctx}")
    ctx_size = llama_cpp.llama_n_ctx(llm.ctx)
    if n_ctx > ctx_size:
        raise InputError(f"n_ctx={n_ctx} exceeds the loaded context ({ctx_size}); load the model with n_ctx >= {n_ctx}")
    n_batch = llama_cpp.llama_n_batch(llm.ctx)
    if n_batch < n_ctx:
        raise InputError(f"n_batch={n_batch} < n_ctx={n_ctx}: a chunk is decoded in one batch; load with n_batch >= {n_ctx}")


def _chunk_nll(logits: np.ndarray, targets: np.ndarray, work: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, as llama.cpp: float32 exp, float64 sum. `work`: a reused buffer."""
    row_max = logits.max(axis=1)
    np.subtract(logits, row_max[:, None], out=work)
    target_shifted = work[np.arange(len(targets)), targets].astype(np.float64)
    np.exp(work, out=work)
    return np.log(work.sum(axis=1, dtype=np.float64)) - target_shifted


class RowBlocks:
    """A chunk's rows cut into blocks, each handed to a thread: numpy releases the GIL in its loops.

    llama-perplexity splits its per-row work over the threads the same way; `max_rows` bounds a block so
    the temporaries of a row-wise computation over the vocabulary stay small.
    """

    def __init__(self, n_threads: int, n_rows: int, max_rows: int | None = None):
        n_blocks = min(max(n_threads, -(-n_rows // max_rows) if max_rows else 1), n_rows)
        edges = np.linspace(0, n_rows, n_blocks + 1).astype(int)
        self.blocks = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
        workers = min(n_threads, len(self.blocks))
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def map(self, fn: Callable, *arrays: np.ndarray) -> list:
        """fn(*(a[block] for a in arrays)) for every block, in block order."""
        if self.pool is None:
            return [fn(*(a[b] for a in arrays)) for b in self.blocks]
        parts = [self.pool.submit(fn, *(a[b] for a in arrays)) for b in self.blocks]
        return [part.result() for part in parts]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class _ChunkScorer:
    """The NLL of a chunk's scored rows, split over the context's threads as llama-perplexity splits it.

    The buffer is allocated once per run (a fresh 50 MB temporary per chunk cost page faults every chunk).
    """

    def __init__(self, n_threads: int, n_rows: int, n_vocab: int):
        self.work = np.empty((n_rows, n_vocab), dtype=np.float32)
        self.rows = RowBlocks(n_threads, n_rows)

    def __call__(self, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return np.concatenate(self.rows.map(_chunk_nll, logits, targets, self.work))

    def close(self) -> None:
        self.rows.close()


def chunk_count(n_tokens: int, n_ctx: int, n_chunks: int | None) -> int:
    """How many whole chunks of n_ctx are scored: all of them when `n_chunks` is None, else at most that."""
    available = n_tokens // n_ctx
    if available == 0:
        raise InputError(f"text too short: {n_tokens} tokens, one chunk needs n_ctx={n_ctx}")
    if n_chunks is not None and n_chunks < 1:
        raise InputError(f"n_chunks must be at least 1, got {n_chunks}")
    return available if n_chunks is None else min(n_chunks, available)


def perplexity(
    llm: llama_cpp.Llama,
    tokens: list[int],
    n_ctx: int = 512,
    n_chunks: int | None = None,
    progress: bool = True,
    on_chunk: ChunkHook | None = None,
) -> PerplexityResult:
    """llama-perplexity over the first `n_chunks` chunks (all whole chunks when None).

    Logits are requested only for the scored positions and read in place from llama.cpp's buffer;
    `on_chunk` sees the same logits, so other metrics ride on this pass (`seconds` includes them).
    The KV cache is left empty afterwards.
    """
    _check_context(llm, n_ctx)
    n_chunks = chunk_count(len(tokens), n_ctx, n_chunks)

    vocab = _vocab(llm)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
    first = n_ctx // 2
    n_scored = n_ctx - 1 - first
    all_tokens = np.asarray(tokens[: n_chunks * n_ctx], dtype=np.int32).reshape(n_chunks, n_ctx)
    memory = llama_cpp.llama_get_memory(llm.ctx)

    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    scorer = _ChunkScorer(llama_cpp.llama_n_threads_batch(llm.ctx), n_scored, n_vocab)
    try:
        # Everything but the tokens is the same for every chunk: positions 0..n_ctx-1, sequence 0,
        # and outputs for positions first..n_ctx-2 only.
        batch.n_tokens = n_ctx
        batch_tokens = np.ctypeslib.as_array(batch.token, shape=(n_ctx,))
        np.ctypeslib.as_array(batch.pos, shape=(n_ctx,))[:] = np.arange(n_ctx)
        np.ctypeslib.as_array(batch.n_seq_id, shape=(n_ctx,))[:] = 1
        wants_logits = np.zeros(n_ctx, dtype=np.int8)
        wants_logits[first : n_ctx - 1] = 1
        np.ctypeslib.as_array(batch.logits, shape=(n_ctx,))[:] = wants_logits
        for i in range(n_ctx):
            batch.seq_id[i][0] = 0

        nll = nll2 = 0.0
        start = time.perf_counter()
        for chunk in tqdm(all_tokens, desc="perplexity", unit="chunk", file=sys.stderr, disable=not progress):
            batch_tokens[:] = chunk
            if bos is not None:
                batch_tokens[0] = bos
            llama_cpp.llama_memory_clear(memory, True)
            if (ret := llama_cpp.llama_decode(llm.ctx, batch)) != 0:
                raise RuntimeError(f"llama_decode failed with code {ret}")
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_scored, n_vocab))
            targets = chunk[first + 1 :]
            values = scorer(logits, targets)
            if on_chunk is not None:
                on_chunk(logits, targets)
            nll += float(values.sum())
            nll2 += float(np.square(values).sum())
        seconds = time.perf_counter() - start
    finally:
        scorer.close()
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_memory_clear(memory, True)
        llm.reset()  # llama-cpp-python's own record of cached tokens must match the emptied cache

    count = n_chunks * n_scored
    mean = nll / count
    if not math.isfinite(mean) or mean > 700:  # exp would overflow; a NaN logit poisons every figure
        raise InputError(f"perplexity is not finite (mean NLL {mean}): the model or its theta produces NaN or "
                         "infinite logits")
    ppl = math.exp(mean)
    variance = max(nll2 / count - mean * mean, 0.0)
    return PerplexityResult(
        ppl=ppl,
        ppl_stderr=ppl * math.sqrt(variance / (count - 1)),
        n_chunks=n_chunks,
        n_ctx=n_ctx,
        tokens_scored=count,
        seconds=seconds,
        tokens_per_second=n_chunks * n_ctx / seconds,
    )
