"""engine.bench on a tiny random model: what it returns and what it leaves behind (no timing assertions)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace

import llama_cpp
import numpy as np
import pytest

from nkat_gguf.engine.measure.bench import device_name, summarize, time_generation, time_prompt
from nkat_gguf.engine.measure.speed import Configuration, SpeedSettings, bench, interleaved_rates
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.errors import InputError
from nkat_gguf.texts import builtin_text
from tools.synthetic_model import build_llama_gguf


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> llama_cpp.Llama:
    path = build_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_batch=64, n_ubatch=64, verbose=False, n_threads=1, n_threads_batch=1
    )


def tokens_decoded(llm: llama_cpp.Llama) -> int:
    llama_cpp.llama_synchronize(llm.ctx)  # llama.cpp books queued decodes into its counters here
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return perf.n_p_eval + perf.n_eval


def cache_is_empty(llm: llama_cpp.Llama) -> bool:
    return llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm.ctx), 0) == -1 and llm.n_tokens == 0


def test_bench_result(llm: llama_cpp.Llama) -> None:
    result = bench(llm, n_prompt=100, n_gen=8, repetitions=3, progress=False)
    for rate in (result.pp_tokens_per_second, result.tg_tokens_per_second, result.avg_latency_ms):
        assert math.isfinite(rate) and rate > 0
    assert result.pp_sd >= 0 and result.tg_sd >= 0
    assert (result.repetitions, result.n_prompt, result.n_gen) == (3, 100, 8)
    assert result.device == device_name() in {"cpu", "gpu"}
    assert json.loads(json.dumps(result.as_dict())) == result.as_dict()


def test_primitives_decode_what_they_time_and_leave_the_cache_empty(llm: llama_cpp.Llama) -> None:
    rng = np.random.default_rng(1)
    llm.eval([1, 2, 3])  # a dirty cache must not leak into the timing or survive it
    before = tokens_decoded(llm)
    assert time_prompt(llm, 100, rng) > 0  # 100 > n_batch=64: two decodes
    assert cache_is_empty(llm)
    assert time_generation(llm, 7, rng) > 0
    assert cache_is_empty(llm)
    assert tokens_decoded(llm) - before == 107


def test_bench_leaves_perplexity_unchanged(llm: llama_cpp.Llama) -> None:
    tokens = tokenize_text(llm, builtin_text("evaluation").content[:5000])
    before = perplexity(llm, tokens, n_ctx=64, n_chunks=2, progress=False).ppl
    bench(llm, n_prompt=64, n_gen=4, repetitions=1, progress=False)
    assert cache_is_empty(llm)
    assert perplexity(llm, tokens, n_ctx=64, n_chunks=2, progress=False).ppl == before


def test_summarize_is_mean_and_sample_sd() -> None:
    rates = [10.0, 12.0, 17.0]
    assert summarize(rates) == pytest.approx((13.0, statistics.stdev(rates)))
    assert summarize([5.0]) == (5.0, 0.0)


def test_rejects_bad_sizes(llm: llama_cpp.Llama) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="n_prompt=600 exceeds"):
        time_prompt(llm, 600, rng)
    with pytest.raises(InputError, match="n_gen must be at least 1"):
        time_generation(llm, 0, rng)
    with pytest.raises(InputError, match="repetitions"):
        bench(llm, repetitions=0, progress=False)


def test_rounds_go_on_until_each_ratio_interval_is_narrow_enough(llm: llama_cpp.Llama) -> None:
    configs = {name: Configuration(llm, lambda: None) for name in ("a", "b")}
    base = SpeedSettings(repetitions=2, n_prompt=16, n_gen=2, progress=False, ratio_pairs=(("a", "b"),),
                         max_repetitions=5)
    wide = interleaved_rates(configs, replace(base, ratio_halfwidth=math.inf))
    assert len(wide["a"]["tg_runs"]) == 2  # no interval asked beyond what two rounds give
    strict = interleaved_rates(configs, replace(base, ratio_halfwidth=0.0))
    assert len(strict["a"]["pp_runs"]) == len(strict["b"]["tg_runs"]) == 5  # never narrower than 0: stops at the cap
