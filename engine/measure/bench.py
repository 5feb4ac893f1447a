"""Throughput as llama.cpp's `llama-bench` measures it, on an already-loaded model.

Method (tools/llama-bench/llama-bench.cpp): pp = decoding n_prompt random tokens (BOS first when the
vocabulary asks for it) in batches of n_batch on an empty cache, logits for the prompt's last token
only (llama-bench asks for the last of every batch: the same work when n_prompt <= n_batch);
tg = n_gen single-token decodes of random tokens from position 0 on an empty cache, logits for each.
Both have one untimed warm-up; the reported rate is the mean of the per-repetition rates, the ± their
sample standard deviation. The context itself is llama-bench's too (engine/llama/runtime.py: flash
attention on, physical batch 512, one thread per physical core for prompt and generation).

`DecodeLoop` holds the batches; its `time_prompt` and `time_generation` are single repetitions, which
engine/measure/speed.py repeats and interleaves, so every speed this tool reports is measured the same way.
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


class DecodeLoop:
    """llama-bench's two timed loops on one context, over batches allocated once and reused.

    Outputs (logits) are requested only where a real prompt or generation reads them: the last
    prompt token, and every generated token (its logits pick the next one). Nothing is allocated
    inside the timed loops, and the only Python work per generated token is two stores and the call.
    """

    def __init__(self, llm: llama_cpp.Llama):
        self.llm = llm
        self.n_batch = llama_cpp.llama_n_batch(llm.ctx)
        self._prompt = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._token = llama_cpp.llama_batch_init(1, 0, 1)
        for batch, n in ((self._prompt, self.n_batch), (self._token, 1)):
            np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
            for i in range(n):
                batch.seq_id[i][0] = 0
        self._tokens = np.ctypeslib.as_array(self._prompt.token, shape=(self.n_batch,))
        self._pos = np.ctypeslib.as_array(self._prompt.pos, shape=(self.n_batch,))
        self._outputs = np.ctypeslib.as_array(self._prompt.logits, shape=(self.n_batch,))
        self._offsets = np.arange(self.n_batch, dtype=np.int32)
        self._token.n_tokens = 1
        self._token.logits[0] = 1

    def time_prompt(self, n_prompt: int, rng: np.random.Generator) -> float:
        """Seconds to decode `n_prompt` random tokens on an empty cache; the cache is empty afterwards."""
        llm = self.llm
        _check_fits(llm, n_prompt, "n_prompt")
        tokens = _random_tokens(llm, n_prompt, rng)
        _clear(llm)
        try:
            start = time.perf_counter()
            for begin in range(0, n_prompt, self.n_batch):
                n = min(self.n_batch, n_prompt - begin)
                self._prompt.n_tokens = n
                self._tokens[:n] = tokens[begin : begin + n]
                np.add(self._offsets[:n], begin, out=self._pos[:n])
                self._outputs[:n] = 0
                if begin + n == n_prompt:
                    self._outputs[n - 1] = 1  # the one position a generation would read
                _decode(llm, self._prompt)
            llama_cpp.llama_synchronize(llm.ctx)
            return time.perf_counter() - start
        finally:
            _clear(llm)

    def time_generation(self, n_gen: int, rng: np.random.Generator) -> float:
        """Seconds for `n_gen` single-token decodes from position 0; the cache is empty afterwards."""
        llm, batch = self.llm, self._token
        _check_fits(llm, n_gen, "n_gen")
        tokens = _random_tokens(llm, n_gen, rng).tolist()
        token, pos = batch.token, batch.pos
        _clear(llm)
        try:
            start = time.perf_counter()
            for i, t in enumerate(tokens):
                token[0] = t
                pos[0] = i
                _decode(llm, batch)
                llama_cpp.llama_synchronize(llm.ctx)
            return time.perf_counter() - start
        finally:
            _clear(llm)

    def close(self) -> None:
        if self._prompt is not None:
            llama_cpp.llama_batch_free(self._prompt)
            llama_cpp.llama_batch_free(self._token)
            self._prompt = self._token = None

    def __enter__(self) -> "DecodeLoop":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def time_prompt(llm: llama_cpp.Llama, n_prompt: int, rng: np.random.Generator) -> float:
    """One pp run (see DecodeLoop.time_prompt); repeated runs should share a DecodeLoop."""
    with DecodeLoop(llm) as loop:
        return loop.time_prompt(n_prompt, rng)


def time_generation(llm: llama_cpp.Llama, n_gen: int, rng: np.random.Generator) -> float:
    """One tg run (see DecodeLoop.time_generation); repeated runs should share a DecodeLoop."""
    with DecodeLoop(llm) as loop:
        return loop.time_generation(n_gen, rng)
