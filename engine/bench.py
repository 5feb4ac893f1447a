"""Throughput as llama.cpp's `llama-bench` measures it, on an already-loaded model.

Method (tools/llama-bench/llama-bench.cpp): pp = decoding n_prompt random tokens (BOS first when the
vocabulary asks for it) in batches of n_batch, logits for the last token only, on an empty cache;
tg = n_gen single-token decodes of random tokens from position 0 on an empty cache. Both have one
untimed warm-up (tg's is a single token, as llama-bench's); the reported rate is the mean of the
per-repetition rates, the ± their sample standard deviation.

`time_prompt` and `time_generation` are single repetitions; engine/measure.py repeats and interleaves
them, so every speed this tool reports is measured the same way.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import llama_cpp
import numpy as np

from nkat_gguf.errors import InputError


@dataclass(frozen=True)
class BenchResult:
    pp_tokens_per_second: float
    pp_sd: float
    tg_tokens_per_second: float
    tg_sd: float
    avg_latency_ms: float  # mean time per generated token
    repetitions: int
    n_prompt: int
    n_gen: int
    device: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def device_name() -> str:
    return "gpu" if llama_cpp.llama_supports_gpu_offload() else "cpu"


def summarize(rates: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as llama-bench reports them."""
    return statistics.fmean(rates), statistics.stdev(rates) if len(rates) > 1 else 0.0


def _random_tokens(llm: llama_cpp.Llama, n: int, rng: np.random.Generator) -> np.ndarray:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokens = rng.integers(0, llama_cpp.llama_vocab_n_tokens(vocab), size=n, dtype=np.int32)
    if llama_cpp.llama_vocab_get_add_bos(vocab):
        tokens[0] = llama_cpp.llama_vocab_bos(vocab)
    return tokens


def _check_fits(llm: llama_cpp.Llama, n: int, what: str) -> None:
    if n < 1:
        raise InputError(f"{what} must be at least 1, got {n}")
    ctx_size = llama_cpp.llama_n_ctx(llm.ctx)
    if n > ctx_size:
        raise InputError(f"{what}={n} exceeds the loaded context ({ctx_size})")


def _clear(llm: llama_cpp.Llama) -> None:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    llm.reset()  # keep llama-cpp-python's record of cached tokens in step with the cache


def _decode(llm: llama_cpp.Llama, batch: llama_cpp.llama_batch) -> None:
    if (ret := llama_cpp.llama_decode(llm.ctx, batch)) != 0:
        raise RuntimeError(f"llama_decode failed with code {ret}")


def time_prompt(llm: llama_cpp.Llama, n_prompt: int, rng: np.random.Generator) -> float:
    """Seconds to decode `n_prompt` random tokens on an empty cache; the cache is empty afterwards."""
    _check_fits(llm, n_prompt, "n_prompt")
    n_batch = llama_cpp.llama_n_batch(llm.ctx)
    tokens = _random_tokens(llm, n_prompt, rng)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        for i in range(n_batch):
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
        _clear(llm)
        start = time.perf_counter()
        for begin in range(0, n_prompt, n_batch):
            part = tokens[begin : begin + n_batch]
            n = len(part)
            batch.n_tokens = n
            np.ctypeslib.as_array(batch.token, shape=(n,))[:] = part
            np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = np.arange(begin, begin + n)
            logits = np.ctypeslib.as_array(batch.logits, shape=(n,))
            logits[:] = 0
            logits[-1] = 1
            _decode(llm, batch)
        llama_cpp.llama_synchronize(llm.ctx)
        return time.perf_counter() - start
    finally:
        llama_cpp.llama_batch_free(batch)
        _clear(llm)


def time_generation(llm: llama_cpp.Llama, n_gen: int, rng: np.random.Generator) -> float:
    """Seconds for `n_gen` single-token decodes from position 0; the cache is empty afterwards."""
    _check_fits(llm, n_gen, "n_gen")
    tokens = _random_tokens(llm, n_gen, rng)
    batch = llama_cpp.llama_batch_init(1, 0, 1)
    try:
        batch.n_tokens = 1
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = 0
        batch.logits[0] = 1
        _clear(llm)
        start = time.perf_counter()
        for pos, token in enumerate(tokens.tolist()):
            batch.token[0] = token
            batch.pos[0] = pos
            _decode(llm, batch)
            llama_cpp.llama_synchronize(llm.ctx)
        return time.perf_counter() - start
    finally:
        llama_cpp.llama_batch_free(batch)
        _clear(llm)
