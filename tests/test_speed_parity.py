"""What keeps the engine at stock llama.cpp speed (issue 14), checked without timing anything.

The decode loops request logits only where a prompt, a generation or perplexity reads them (counted
on a real context through llama_get_logits_ith, which answers only for positions that have outputs),
the context is llama-bench's, and doctor reports the build's instruction sets.
"""

from __future__ import annotations

import os
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from nkat_gguf.doctor import OK, WARN, check_build_features, run_checks
from nkat_gguf.engine.measure.bench import DecodeLoop
from nkat_gguf.engine.llama.native_log import captured_llama_log
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import N_UBATCH, NkatRuntime, RuntimeOptions, physical_cores
from nkat_gguf.engine.llama.system_info import build_features, parse_system_info
from nkat_gguf.texts import builtin_text


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory):
    from tools.synthetic_model import build_llama_gguf

    path = build_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    with NkatRuntime(path, RuntimeOptions(n_ctx=256, n_batch=64, n_threads=1)) as rt:
        yield rt


@pytest.fixture
def outputs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int]]]:
    """(batch size, batch positions that got logits) of every llama_decode the engine makes from now on."""
    seen: list[tuple[int, list[int]]] = []
    real_decode = llama_cpp.llama_decode

    def decode_and_count(ctx, batch):
        ret = real_decode(ctx, batch)
        with captured_llama_log():  # llama.cpp logs an error for each position without logits
            seen.append((batch.n_tokens, [i for i in range(batch.n_tokens) if llama_cpp.llama_get_logits_ith(ctx, i)]))
        return ret

    monkeypatch.setattr(llama_cpp, "llama_decode", decode_and_count)
    return seen


def test_prompt_asks_for_the_last_token_only(runtime: NkatRuntime, outputs: list) -> None:
    with DecodeLoop(runtime.llm) as loop:
        loop.time_prompt(100, np.random.default_rng(0))  # n_batch 64: two decodes
    assert outputs == [(64, []), (36, [35])]


def test_generation_asks_for_each_token_it_would_sample(runtime: NkatRuntime, outputs: list) -> None:
    with DecodeLoop(runtime.llm) as loop:
        loop.time_generation(5, np.random.default_rng(0))
    assert outputs == [(1, [0])] * 5


def test_perplexity_asks_for_the_scored_positions_only(runtime: NkatRuntime, outputs: list) -> None:
    tokens = tokenize_text(runtime.llm, builtin_text("evaluation").content[:4000])
    perplexity(runtime.llm, tokens, n_ctx=64, n_chunks=2, progress=False)
    assert outputs == [(64, list(range(32, 63)))] * 2  # positions n_ctx/2 .. n_ctx-2 predict the next token


def test_perplexity_is_the_same_on_one_thread_and_two(tmp_path: Path) -> None:
    from tools.synthetic_model import build_llama_gguf

    path = build_llama_gguf(tmp_path / "tiny.gguf")
    text = builtin_text("evaluation").content[:4000]
    ppl = []
    for threads in (1, 2):  # the NLL rows are split over the threads: the sum must not change
        with NkatRuntime(path, RuntimeOptions(n_ctx=64, n_batch=64, n_threads=threads)) as rt:
            ppl.append(perplexity(rt.llm, tokenize_text(rt.llm, text), n_ctx=64, n_chunks=2, progress=False).ppl)
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)


def test_context_is_llama_bench_s() -> None:
    kwargs = RuntimeOptions(n_ctx=1024, n_batch=1024, n_threads=3).llama_kwargs()
    assert kwargs["flash_attn"] is True  # llama.cpp's "auto" resolves to on for the CPU
    assert kwargs["n_ubatch"] == N_UBATCH == 512
    assert kwargs["n_threads"] == kwargs["n_threads_batch"] == 3
    default = RuntimeOptions().llama_kwargs()
    assert default["n_threads"] == default["n_threads_batch"] == physical_cores()
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_doctor_reports_the_build_s_instruction_sets() -> None:
    system_info = llama_cpp.llama_print_system_info().decode()
    checks = {c.name: c for c in run_checks()}
    assert checks["llama.cpp build"].detail == system_info.strip()
    built = parse_system_info(system_info)
    assert "AVX2" in built or "NEON" in built  # any build worth running has one of them
    for feature in ("AVX2", "AVX512", "NEON"):
        if feature in built:
            assert feature in checks["CPU features"].detail
    assert build_features(system_info).unused == () or checks["CPU features"].status == WARN


def test_doctor_warns_about_instruction_sets_the_build_leaves_unused() -> None:
    older_build = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 |"
    build, features = check_build_features(older_build, {"pni", "ssse3", "avx", "avx2", "f16c", "fma", "avx512f",
                                                         "avx512_vnni"})
    assert build.status == OK and build.detail == older_build
    assert features.status == WARN and "AVX512, AVX512_VNNI" in features.detail
    assert "--no-cache-dir --force-reinstall" in features.fix
    _, same = check_build_features(older_build, {"pni", "ssse3", "avx", "avx2", "f16c", "fma"})
    assert same.status == OK
