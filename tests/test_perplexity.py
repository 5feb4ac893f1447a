"""engine.perplexity against an independent, slow computation through llama-cpp-python's high-level API."""

from __future__ import annotations

import math
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import write_with_metadata
from nkat_gguf.texts import builtin_text
from tools.synthetic_model import build_llama_gguf

TEXT = builtin_text("evaluation").content[:60_000]  # ample for the few chunks used here


def load(path: Path, **kwargs: object) -> llama_cpp.Llama:
    # One thread: on a busy 2-core machine, two spinning llama.cpp threads run several times slower.
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, verbose=False, n_threads=1, n_threads_batch=1,
        **kwargs,
    )


def reference_nll(path: Path, tokens: list[int], n_ctx: int, n_chunks: int, bos: int | None) -> np.ndarray:
    """NLL of every scored token from full per-position logits (`logits_all`), in float64."""
    llm = load(path, logits_all=True)
    values = []
    for c in range(n_chunks):
        chunk = list(tokens[c * n_ctx : (c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        scores = np.array(llm.scores[:n_ctx], dtype=np.float64)
        for j in range(n_ctx // 2, n_ctx - 1):
            row = scores[j]
            top = row.max()
            values.append(top + math.log(np.exp(row - top).sum()) - row[chunk[j + 1]])
    return np.array(values)


def ppl_and_stderr(nll: np.ndarray) -> tuple[float, float]:
    ppl = math.exp(nll.mean())
    return ppl, ppl * math.sqrt(nll.var() / (len(nll) - 1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_bos(tiny: Path) -> Path:
    dst = tiny.with_name("tiny-bos.gguf")
    write_with_metadata(tiny, dst, {"tokenizer.ggml.add_bos_token": True})
    return dst


@pytest.mark.parametrize(("model", "n_ctx", "n_chunks"), [("tiny", 64, 3), pytest.param("default", 128, 2, marks=pytest.mark.slow)])
def test_matches_slow_reference(model: str, n_ctx: int, n_chunks: int, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue("tiny") if model == "tiny" else default_model_path()
    llm = load(path)
    tokens = tokenize_text(llm, TEXT)
    assert tokens[0] != llm.token_bos()  # both models say add_bos_token = false

    result = perplexity(llm, tokens, n_ctx=n_ctx, n_chunks=n_chunks, progress=False)

    ppl, stderr = ppl_and_stderr(reference_nll(path, tokens, n_ctx, n_chunks, bos=None))
    assert result.ppl == pytest.approx(ppl, rel=1e-4)
    assert result.ppl_stderr == pytest.approx(stderr, rel=1e-3)
    assert (result.n_chunks, result.n_ctx, result.tokens_scored) == (n_chunks, n_ctx, n_chunks * (n_ctx // 2 - 1))
    assert result.seconds > 0 and result.tokens_per_second > 0
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm.ctx), 0) == -1


def test_add_bos_replaces_first_token_of_every_chunk(tiny_bos: Path) -> None:
    llm = load(tiny_bos)
    tokens = tokenize_text(llm, TEXT)
    bos = llm.token_bos()
    assert tokens[0] == bos and tokens[1] != bos

    result = perplexity(llm, tokens, n_ctx=32, n_chunks=3, progress=False)

    with_bos, _ = ppl_and_stderr(reference_nll(tiny_bos, tokens, 32, 3, bos=bos))
    without_bos, _ = ppl_and_stderr(reference_nll(tiny_bos, tokens, 32, 3, bos=None))
    assert result.ppl == pytest.approx(with_bos, rel=1e-4)
    assert result.ppl != pytest.approx(without_bos, rel=1e-4)


def test_all_whole_chunks_by_default_and_too_many_capped(tiny: Path) -> None:
    llm = load(tiny)
    tokens = tokenize_text(llm, TEXT)[: 2 * 64 + 10]
    assert perplexity(llm, tokens, n_ctx=64, progress=False).n_chunks == 2
    assert perplexity(llm, tokens, n_ctx=64, n_chunks=5, progress=False).n_chunks == 2


def test_rejects_bad_input(tiny: Path) -> None:
    llm = load(tiny)
    tokens = tokenize_text(llm, TEXT)
    with pytest.raises(InputError, match="too short"):
        perplexity(llm, tokens[:63], n_ctx=64, progress=False)
    with pytest.raises(InputError, match="exceeds the loaded context"):
        perplexity(llm, tokens, n_ctx=1024, progress=False)
    with pytest.raises(InputError, match="n_chunks"):
        perplexity(llm, tokens, n_ctx=64, n_chunks=0, progress=False)
    small_batch = llama_cpp.Llama(model_path=str(tiny), n_ctx=512, n_batch=128, verbose=False, n_threads=1)
    with pytest.raises(InputError, match="n_batch=128 < n_ctx=256"):
        perplexity(small_batch, tokens, n_ctx=256, progress=False)
