"""KL divergence as llama-perplexity computes it: the base file, the math, and both engine paths on real models.

Checked against an independent float64 computation from full per-position logits (llama-cpp-python's
`logits_all`), on a tiny random llama and a perturbed copy (its weights quantized to Q8_0).
Self-comparison through the base file is not exactly 0: the file stores each log-probability within
scale/2 = 16/65535/2 ≈ 1.2e-4 of the true one, so |KLD| per token is bounded by that (plus float32
rounding); that bound is what is asserted.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType

from nkat_gguf.cli import main
from nkat_gguf.evaluate.compare import CompareSettings
from nkat_gguf.engine.measure.kld import kl_divergence, measure_model, write_base
from nkat_gguf.engine.measure.perplexity import tokenize_text
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.evaluate.quality import measure_files
from nkat_gguf.format.kld_base import BaseFile, BaseWriter, Header, base_writer, decode_rows, encode_rows, row_width
from nkat_gguf.math.kld import TokenStats, mean_and_uncertainty, percentile, summarize, token_stats
from nkat_gguf.texts import Text, builtin_text
from tools.synthetic_model import build_llama_gguf

N_CTX, N_CHUNKS = 64, 2
TEXT = Text(builtin_text("evaluation").content[:20_000], "pydoc (first 20,000 characters)")
STORAGE_BOUND = 16 / 65535 / 2 * 1.01 + 2e-6  # per-token |KLD| of a model against its own stored log-probs


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny F32 llama and the same weights at Q8_0: close distributions, like a quantization."""
    d = tmp_path_factory.mktemp("kld")
    return (build_llama_gguf(d / "ref-f32.gguf", seed=3),
            build_llama_gguf(d / "q8.gguf", weight_type=GGMLQuantizationType.Q8_0, seed=3))


def load(path: Path, **kwargs: object) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, verbose=False,
                           n_threads=2, n_threads_batch=2, **kwargs)


def scored_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """Logits of every scored position, (chunks * scored, vocab), from a full `logits_all` evaluation."""
    llm = load(path, logits_all=True, type_k=0, type_v=0, flash_attn=False)  # as RuntimeOptions(f32_kv_cache=True)
    rows = []
    for c in range(N_CHUNKS):
        llm.reset()
        llm.eval(tokens[c * N_CTX:(c + 1) * N_CTX])
        rows.append(np.array(llm.scores[N_CTX // 2:N_CTX - 1], dtype=np.float32))
    return np.concatenate(rows)


# --- the base file ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_vocab", [1000, 1001])  # an odd vocabulary has one uint16 of padding per row
def test_base_file_round_trips_within_its_precision(tmp_path: Path, n_vocab: int) -> None:
    rng = np.random.default_rng(0)
    n_ctx, n_chunk = 16, 3
    tokens = rng.integers(0, n_vocab, n_chunk * n_ctx)
    chunks = [(rng.standard_normal((n_ctx - 1 - n_ctx // 2, n_vocab)) * 4).astype(np.float32) for _ in range(n_chunk)]
    chunks[0][0] = 1.5  # equal logits: scale 0, stored as zeros
    path = tmp_path / "base.kld"
    with base_writer(path, n_ctx, n_vocab, tokens) as writer:
        for logits in chunks:
            writer.write_chunk(logits)
    assert path.stat().st_size == Header(n_ctx, n_vocab, n_chunk).file_bytes
    with BaseFile(path) as base:
        assert base.header == Header(n_ctx, n_vocab, n_chunk)
        np.testing.assert_array_equal(base.tokens, tokens)
        for c, logits in enumerate(chunks):
            exact = log_softmax64(logits)
            stored = base.log_probs(c)
            assert stored.shape == logits.shape and stored.dtype == np.float32
            kept = exact > exact.max(axis=1, keepdims=True) - 16
            scale = base.chunk_rows(c)[:, :4].copy().view(np.float32)[:, 0]
            assert np.all(np.abs(stored - exact)[kept] <= (scale[:, None] / 2 + 1e-5).repeat(n_vocab, 1)[kept])
            # below max - 16 every log-probability is clamped to the row's minimum
            np.testing.assert_allclose(stored[~kept], np.broadcast_to(stored.min(axis=1, keepdims=True),
                                                                      stored.shape)[~kept])
            if n_vocab % 2:
                assert not base.chunk_rows(c)[:, -1].any()
    assert row_width(n_vocab) == n_vocab + 4 + n_vocab % 2


def test_base_writer_refuses_partial_output(tmp_path: Path) -> None:
    path = tmp_path / "base.kld"
    with pytest.raises(ValueError, match="1 of 2 chunks"):
        with base_writer(path, 8, 10, np.zeros(16)) as writer:
            writer.write_chunk(np.zeros((3, 10), np.float32))
    assert not path.exists()  # written atomically: nothing with the final name


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"not a base file" + b[15:], "not a llama-perplexity KL-divergence base file"),
    (lambda b: b[:-1], "is truncated"),
    (lambda b: b + b"\0\0", "longer than its header says"),
    (lambda b: b[:20], "is truncated"),
    (lambda b: b[:12] + np.int32(0).tobytes() + b[16:], "impossible header"),
])
def test_damaged_base_file_is_one_clear_error(tmp_path: Path, damage, message: str) -> None:
    stream = io.BytesIO()
    writer = BaseWriter(stream, 8, 10, np.arange(16) % 10)
    for _ in range(2):
        writer.write_chunk(np.random.default_rng(1).standard_normal((3, 10)).astype(np.float32))
    path = tmp_path / "damaged.kld"
    path.write_bytes(damage(stream.getvalue()))
    with pytest.raises(InputError, match=message):
        BaseFile(path)


# --- the math ----------------------------------------------------------------------------------------------------

def test_token_stats_match_float64_and_stock_statistics() -> None:
    rng = np.random.default_rng(2)
    base_logits = (rng.standard_normal((40, 300)) * 3).astype(np.float32)
    logits = (base_logits + rng.standard_normal(base_logits.shape) * 0.5).astype(np.float32)
    targets = rng.integers(0, 300, 40)
    stored = decode_rows(encode_rows(base_logits), 300)
    stats = token_stats(logits, stored, targets)
    p, q = log_softmax64(base_logits), log_softmax64(logits)
    np.testing.assert_allclose(stats.kld, (np.exp(p) * (p - q)).sum(axis=1), atol=2e-4)
    np.testing.assert_allclose(stats.nll, -q[np.arange(40), targets], rtol=1e-5)
    np.testing.assert_allclose(stats.p_diff, np.exp(q[np.arange(40), targets]) - np.exp(p[np.arange(40), targets]),
                               atol=1e-4)
    np.testing.assert_array_equal(stats.same_top, logits.argmax(1) == base_logits.argmax(1))
    summary = summarize(stats)
    mean, err = mean_and_uncertainty(stats.kld)
    assert (summary.kld, summary.kld_stderr) == (mean, err)
    assert err == pytest.approx(np.std(stats.kld) / math.sqrt(39), rel=1e-9)
    assert summary.kld_ci95 == pytest.approx((mean - 1.96 * err, mean + 1.96 * err))
    ordered = np.sort(stats.kld.astype(np.float32))
    assert summary.kld_median == pytest.approx(float(ordered[19] + ordered[20]) / 2, rel=1e-6)
    assert summary.kld_percentiles["99.0"] == pytest.approx(np.percentile(ordered, 99.0), rel=1e-5)
    assert summary.kld_max == ordered[-1] and summary.kld_min == ordered[0]
    assert percentile(ordered, 0.0) == ordered[0] and percentile(ordered, 1.0) == ordered[-1]
    assert summary.same_top == stats.same_top.mean()
    assert mean_and_uncertainty(np.ones(5))[1] == 0.0  # stock reports no uncertainty for n <= 10


# --- both engine paths on real models ----------------------------------------------------------------------------

def test_self_kld_through_the_file_is_within_its_precision(models: tuple[Path, Path], tmp_path: Path) -> None:
    llm = load(models[0])
    tokens = tokenize_text(llm, TEXT.content)
    ppl = write_base(llm, tokens, tmp_path / "self.kld", N_CTX, N_CHUNKS, progress=False)
    result = kl_divergence(llm, tmp_path / "self.kld", progress=False, tokens=tokens)
    k = result.kld
    assert k.tokens == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)
    assert max(abs(k.kld_max), abs(k.kld_min)) <= STORAGE_BOUND and abs(k.kld) <= STORAGE_BOUND
    assert k.same_top == 1.0
    assert result.perplexity.ppl == ppl.ppl  # the same pass over the file's tokens
    assert k.ppl_base == pytest.approx(ppl.ppl, rel=2e-4)


@pytest.mark.parametrize("path", ["file", "in-process"])
def test_kld_matches_a_direct_float64_computation(models: tuple[Path, Path], tmp_path: Path, path: str) -> None:
    ref, quant = models
    tokens = tokenize_text(load(ref), TEXT.content)
    p = log_softmax64(scored_logits(ref, tokens))
    q = log_softmax64(scored_logits(quant, tokens))
    direct = (np.exp(p) * (p - q)).sum(axis=1)
    targets = np.concatenate([tokens[c * N_CTX + N_CTX // 2 + 1:(c + 1) * N_CTX] for c in range(N_CHUNKS)])
    options = RuntimeOptions(n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, f32_kv_cache=True)  # exact logits
    base = tmp_path / "ref.kld"
    if path == "file":
        write = measure_model(ref, options, False, None, TEXT, N_CTX, N_CHUNKS, base, progress=False)
        assert write["kld"] is None and write["kl_divergence_base"] == str(base)
        out = measure_model(quant, options, False, None, None, None, None, base, True, progress=False)
    else:
        out = measure_model(quant, options, False, None, TEXT, N_CTX, N_CHUNKS, base_model=ref, progress=False)
        assert out["kl_divergence_base"] is None and out["kld_base_model"] == str(ref)
    k = out["kld"]
    assert 1e-4 < direct.mean() < 1.0  # a real, small divergence: the test can fail either way
    assert k["kld"] == pytest.approx(direct.mean(), rel=0.01, abs=2e-4)
    assert k["kld_max"] == pytest.approx(direct.max(), rel=0.01, abs=2e-4)
    assert k["kld_median"] == pytest.approx(np.median(direct), rel=0.01, abs=2e-4)
    # same top may differ only on near-ties: reference top two within a storage step, or this model's
    # top two within the engine's float noise
    def top_gap(x: np.ndarray) -> np.ndarray:
        two = np.sort(x, axis=1)[:, -2:]
        return two[:, 1] - two[:, 0]

    near_ties = int(((top_gap(p) < 16 / 65535) | (top_gap(q) < 1e-3)).sum())
    assert abs(k["same_top"] - (p.argmax(1) == q.argmax(1)).mean()) * len(p) <= near_ties
    rows = np.arange(len(targets))
    assert k["p_diff_mean"] == pytest.approx((np.exp(q[rows, targets]) - np.exp(p[rows, targets])).mean(), abs=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(-q[rows, targets].mean()), rel=1e-3)


def test_mismatched_base_file_is_one_clear_error(models: tuple[Path, Path], tmp_path: Path) -> None:
    ref = models[0]
    llm = load(ref)
    tokens = tokenize_text(llm, TEXT.content)
    base = tmp_path / "ref.kld"
    write_base(llm, tokens, base, N_CTX, N_CHUNKS, progress=False)
    other_text = tokenize_text(llm, builtin_text("licenses").content[:20_000])
    with pytest.raises(InputError, match="tokens differ from this text's from token"):
        kl_divergence(llm, base, progress=False, tokens=other_text)
    small_vocab = tmp_path / "small-vocab.kld"
    with base_writer(small_vocab, N_CTX, 1000, np.asarray(tokens[:N_CTX]) % 1000) as writer:
        writer.write_chunk(np.zeros((N_CTX - 1 - N_CTX // 2, 1000), np.float32))
    with pytest.raises(InputError, match="vocabulary of 1000 tokens, this model has 49152"):
        kl_divergence(llm, small_vocab, progress=False)
    # through the command line: one line each, exit code 1
    for args, message in (
        (["--kl-divergence-base", str(small_vocab), "--kl-divergence"], "vocabulary of 1000 tokens"),
        (["--kl-divergence-base", str(base), "--kl-divergence", "--ctx", "128"], "written with n_ctx=64"),
        (["--kl-divergence-base", str(base), "--kl-divergence", "--text", str(tmp_path / "other.txt")],
         "tokens differ"),
        (["--kl-divergence"], "give it with --kl-divergence-base FILE"),
        (["--kl-divergence-base", str(base), "--kl-divergence", "--kld-base-model", str(ref)], "drop --kl-divergence"),
        (["--kl-divergence-base", str(tmp_path / "missing.kld"), "--kl-divergence"], "No such file"),
    ):
        (tmp_path / "other.txt").write_text(builtin_text("licenses").content[:20_000])
        run = CliRunner().invoke(main, ["perplexity", "-m", str(ref), *args])
        lines = [line for line in run.output.splitlines() if line.strip()]
        assert run.exit_code == 1 and len(lines) == 1 and message in lines[0], (args, run.output)


def test_cli_writes_a_base_and_compares_with_it(models: tuple[Path, Path], tmp_path: Path) -> None:
    ref, quant = models
    base = tmp_path / "cli.kld"
    common = ["--ctx", str(N_CTX), "--chunks", str(N_CHUNKS), "--threads", "2", "--json"]
    wrote = CliRunner().invoke(main, ["perplexity", "-m", str(ref), "--kl-divergence-base", str(base), *common])
    assert wrote.exit_code == 0, wrote.output
    with BaseFile(base) as f:
        assert f.header.n_ctx == N_CTX and f.header.n_chunk == N_CHUNKS
    read = CliRunner().invoke(main, ["perplexity", "-m", str(quant), "--kl-divergence-base", str(base),
                                     "--kl-divergence", "--threads", "2", "--json"])
    (tmp_path / "t.txt").write_text(TEXT.content)
    inline = CliRunner().invoke(main, ["perplexity", "-m", str(quant), "--kld-base-model", str(ref), *common,
                                       "--text", str(tmp_path / "t.txt")])
    assert read.exit_code == 0 and inline.exit_code == 0, (read.output, inline.output)
    a, b = json.loads(read.stdout)["kld"], json.loads(inline.stdout)["kld"]
    assert a["kld"] == b["kld"] > 0 and a["tokens"] == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)
    text = CliRunner().invoke(main, ["perplexity", "-m", str(quant), "--kl-divergence-base", str(base),
                                     "--kl-divergence", "--threads", "2"])
    assert all(s in text.stdout for s in ("Mean    KLD:", "Same top p:", "99.0%   KLD:", "Median  KLD:"))


def test_measure_files_reuses_the_reference_bases(models: tuple[Path, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ref, quant = models
    settings = CompareSettings(n_ctx=N_CTX, n_chunks=1, repetitions=1, n_prompt=32, n_gen=4, progress=False)
    options = RuntimeOptions(n_ctx=N_CTX, n_batch=N_CTX, n_threads=2)
    texts = {"a": TEXT}
    bases = {"a": tmp_path / "a.kld"}
    first = measure_files({"reference": ref, "q8": quant}, texts, options, settings, bases, "reference")
    assert first["reference"]["kld"] == {"a": None} and first["q8"]["kld"]["a"]["kld"] > 0
    monkeypatch.setattr("nkat_gguf.evaluate.quality.write_base",
                        lambda *a, **k: pytest.fail("the cached base file was written again"))
    again = measure_files({"reference": ref, "q8": quant}, texts, options, settings, bases, "reference")
    assert again["q8"]["kld"]["a"]["kld"] == first["q8"]["kld"]["a"]["kld"]
    assert again["reference"]["perplexity"] == first["reference"]["perplexity"]


def test_token_stats_concatenate() -> None:
    parts = [TokenStats(np.ones(2), np.ones(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.float32),
                        np.ones(2, bool)) for _ in range(3)]
    assert len(TokenStats.concatenate(parts).kld) == 6
