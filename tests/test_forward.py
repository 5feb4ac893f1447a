"""The PyTorch forward against llama.cpp (logits) and against direct computations
(input statistics, input hooks, weight overrides)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType, GGUFValueType
from llama_cpp import Llama

from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.forward.llama import BLOCK_MATRICES, LlamaConfig, LlamaForward, llama_block, supports_forward
from nkat_gguf.errors import InputError, UnsupportedModelError
from nkat_gguf.format.gguf_file import (
    TensorSpec,
    Value,
    copy_metadata,
    read_layout,
    write_gguf,
    write_with_metadata,
)
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.texts import builtin_text
from tools.fetch_yardstick import DEFAULT_OUTPUT as YARDSTICK
from tools.synthetic_model import (
    TINY,
    LlamaShape,
    build_llama_gguf,
    build_qwen2_gguf,
    llama_tensor_specs,
    qwen2_tensor_specs,
)

# Measured max |forward - llama.cpp| logit (F32 weights, F32 KV cache), asserted with a margin:
# tiny random models 4.8e-6 and 7.6e-6 (logits up to 5.6), tiny random qwen2 models 5.8e-6 and
# 6.2e-6 (logits up to 5.5); the default model dequantized to F32
# 9.8e-5 on the 256 tokens below and 1.4e-4 on one 400-token sequence (logits up to 42). Top-1
# agreed at every position.
TINY_TOLERANCE = 1e-4
DEFAULT_TOLERANCE = 1e-3

UNTIED = LlamaShape(d_model=64, n_ff=96, n_layers=3, n_head=4, n_head_kv=1, tied_embeddings=False)


# ---- helpers ------------------------------------------------------------------------------------


def llama_cpp_logits(path: Path, sequences: list[list[int]]) -> list[np.ndarray]:
    """llama.cpp's logits at every position, one fresh KV cache per sequence (F32 cache: see facts)."""
    n_ctx = max(len(s) for s in sequences)
    llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0, verbose=False, n_threads=2)
    try:
        out = []
        for seq in sequences:
            llm.reset()
            llm.eval(seq)
            out.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
        return out
    finally:
        llm.close()


def assert_logits_close(ours: list[np.ndarray], theirs: list[np.ndarray], tolerance: float) -> None:
    """Max |Δlogit| within tolerance; top-1 equal wherever our top-2 margin exceeds twice that."""
    assert [a.shape for a in ours] == [b.shape for b in theirs]
    a, b = np.concatenate(ours), np.concatenate(theirs)
    assert np.abs(a - b).max() <= tolerance
    top2 = np.sort(a, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(a.argmax(1)[clear], b.argmax(1)[clear])


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_tokens() -> list[int]:
    """Real text through the default model's tokenizer (add_bos_token is false there)."""
    llm = Llama(model_path=str(default_model_path()), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(builtin_text("calibration").content[:2000].encode(), add_bos=False)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def sequences(text_tokens: list[int]) -> list[list[int]]:
    """Positions restart per sequence; the two of length 48 share one attention call, the 32 has its own."""
    return [text_tokens[:48], text_tokens[48:80], text_tokens[80:128]]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama_gguf(tmp_path_factory.mktemp("ref") / "tiny.gguf", TINY)


@pytest.fixture(scope="module")
def untied_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied head, one kv head for four query heads, three layers."""
    return build_llama_gguf(tmp_path_factory.mktemp("ref") / "untied.gguf", UNTIED, seed=1)


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen2: q/k/v biases, NEOX rope, rope base 1e6 (Qwen2.5's), tied head."""
    return build_qwen2_gguf(tmp_path_factory.mktemp("ref") / "qwen2.gguf", TINY, seed=3)


@pytest.fixture(scope="module")
def qwen2_untied_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen2_gguf(tmp_path_factory.mktemp("ref") / "qwen2-untied.gguf", UNTIED, seed=4)


@pytest.fixture(scope="module")
def qwen2_unbiased_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qwen2 file without the biases: llama.cpp loads it and adds none (its bq/bk/bv are optional)."""
    layout = read_layout(build_qwen2_gguf(tmp_path_factory.mktemp("ref") / "with.gguf", TINY, seed=5))
    source = TensorSource(layout.path)
    specs = [spec for spec in qwen2_tensor_specs(TINY, LlamaConfig.from_layout(layout).vocab_size,
                                                 GGMLQuantizationType.F32) if not spec.name.endswith(".bias")]
    dst = tmp_path_factory.mktemp("ref") / "qwen2-unbiased.gguf"
    write_gguf(dst, copy_metadata(layout), specs, lambda spec: source.dequantize(spec.name))
    return dst


@pytest.fixture(scope="module")
def default_f32_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model dequantized to F32, so llama.cpp computes in float32 as the forward does."""
    source = TensorSource(default_model_path())
    metadata = copy_metadata(source.layout)
    metadata["general.file_type"] = Value(GGUFValueType.UINT32, 0)
    specs = [TensorSpec(t.name, source.numpy_shape(t.name), GGMLQuantizationType.F32) for t in source.layout.tensors]
    dst = tmp_path_factory.mktemp("ref") / "default-f32.gguf"
    write_gguf(dst, metadata, specs, produce=lambda spec: source.dequantize(spec.name))
    return dst


# ---- logits against llama.cpp -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_path", "untied_path", "qwen2_path", "qwen2_untied_path",
                                   "qwen2_unbiased_path"])
def test_tiny_logits_match_llama_cpp(model: str, sequences: list[list[int]], request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    assert_logits_close(LlamaForward(path).logits(sequences), llama_cpp_logits(path, sequences), TINY_TOLERANCE)


@pytest.mark.slow
def test_default_model_logits_match_llama_cpp(default_f32_path: Path, text_tokens: list[int]) -> None:
    """The forward reads the Q4_1 file itself; its dequantization is what the F32 file holds."""
    assert len(text_tokens) >= 256
    sequences = [text_tokens[:96], text_tokens[96:160], text_tokens[160:256]]
    ours = LlamaForward(default_model_path()).logits(sequences)
    assert_logits_close(ours, llama_cpp_logits(default_f32_path, sequences), DEFAULT_TOLERANCE)


# ---- input statistics ---------------------------------------------------------------------------


def recording_hooks(config: LlamaConfig) -> tuple[dict[str, Callable], dict[str, list[torch.Tensor]]]:
    """Identity hooks on every 2-D weight that keep a copy of what each weight multiplies."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)

    def record(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(x: torch.Tensor) -> torch.Tensor:
            seen[name].append(x.clone())
            return x
        return hook

    names = [f"blk.{i}.{m}.weight" for i in range(config.n_layer) for m in BLOCK_MATRICES] + [config.head_weight]
    return {name: record(name) for name in names}, seen


def test_input_mean_squares_are_means_of_what_each_weight_sees(untied_path: Path, sequences: list[list[int]]) -> None:
    config = LlamaConfig.from_layout(read_layout(untied_path))
    hooks, seen = recording_hooks(config)
    stats = LlamaForward(untied_path, input_hooks=hooks).input_mean_squares(sequences)
    assert stats.keys() == seen.keys()
    assert len(stats) == 7 * UNTIED.n_layers + 1 and "output.weight" in stats
    for name, mean_square in stats.items():
        x = torch.cat(seen[name]).double().numpy()  # (N, in)
        assert x.shape[0] == sum(map(len, sequences))
        assert mean_square.dtype == np.float32 and mean_square.shape == (x.shape[1],)
        np.testing.assert_allclose(mean_square, (x**2).mean(0), rtol=1e-6, err_msg=name)
    unhooked = LlamaForward(untied_path).input_mean_squares(sequences)
    for name, mean_square in stats.items():
        np.testing.assert_array_equal(mean_square, unhooked[name])  # identity hooks change nothing


def test_second_moments_are_shared_means_of_x_xT(untied_path: Path, sequences: list[list[int]]) -> None:
    """E[x xᵀ] per weight: the mean outer product of what it sees, one array per shared input."""
    config = LlamaConfig.from_layout(read_layout(untied_path))
    hooks, seen = recording_hooks(config)
    means, moments = LlamaForward(untied_path, input_hooks=hooks).input_statistics(sequences)
    assert moments.keys() == means.keys()
    for name, h in moments.items():
        x = torch.cat(seen[name]).double().numpy()  # (N, in)
        assert h.dtype == np.float64 and h.shape == (x.shape[1],) * 2
        expected = x.T @ x / len(x)  # float32 Gram products: absolute tolerance on the scale of the matrix
        np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(), err_msg=name)
        np.testing.assert_allclose(np.diag(h), means[name], rtol=1e-5, err_msg=name)
    p = "blk.1."
    assert moments[p + "attn_q.weight"] is moments[p + "attn_k.weight"] is moments[p + "attn_v.weight"]
    assert moments[p + "ffn_gate.weight"] is moments[p + "ffn_up.weight"]
    assert moments[p + "attn_output.weight"] is not moments[p + "attn_q.weight"]
    assert moments[p + "ffn_down.weight"] is not moments[p + "ffn_up.weight"]
    assert LlamaForward(untied_path).input_statistics(sequences, second_moments=False)[1] == {}


def test_input_mean_squares_of_layer_0_from_numpy(tiny_path: Path, sequences: list[list[int]]) -> None:
    """attn_q/k/v see RMSNorm(embedding) * attn_norm; ffn_down sees silu(gate x) * up x."""
    source = TensorSource(tiny_path)
    config = LlamaConfig.from_layout(source.layout)
    hooks, seen = recording_hooks(config)
    stats = LlamaForward(source, input_hooks=hooks).input_mean_squares(sequences)
    assert "output.weight" not in stats and "token_embd.weight" not in stats  # tied head: no entry

    e = source.dequantize("token_embd.weight").astype(np.float64)[np.concatenate(sequences)]  # (N, d)
    normed = e / np.sqrt((e**2).mean(1, keepdims=True) + config.norm_eps) * source.dequantize("blk.0.attn_norm.weight")
    for m in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(stats[f"blk.0.{m}.weight"], (normed**2).mean(0), rtol=1e-5)

    x = torch.cat(seen["blk.0.ffn_gate.weight"]).double().numpy()  # (N, d), the normed FFN input
    gate = x @ source.dequantize("blk.0.ffn_gate.weight").T.astype(np.float64)  # (N, ff)
    up = x @ source.dequantize("blk.0.ffn_up.weight").T.astype(np.float64)  # (N, ff)
    down_input = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(stats["blk.0.ffn_down.weight"], (down_input**2).mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["blk.0.ffn_up.weight"], stats["blk.0.ffn_gate.weight"], rtol=0)


# ---- hooks and weight overrides -----------------------------------------------------------------


def test_identity_hooks_leave_logits_unchanged(tiny_path: Path, sequences: list[list[int]]) -> None:
    config = LlamaConfig.from_layout(read_layout(tiny_path))
    hooks, _ = recording_hooks(config)
    plain = LlamaForward(tiny_path).logits(sequences)
    for a, b in zip(plain, LlamaForward(tiny_path, input_hooks=hooks).logits(sequences)):
        np.testing.assert_array_equal(a, b)


def test_rotation_hook_with_rotated_weights_is_the_same_model(untied_path: Path, sequences: list[list[int]]) -> None:
    """W·(R·x) with the hook alone changes the model; with W replaced by W·R^T it is W·x again."""
    source = TensorSource(untied_path)
    rotations = {
        "blk.0.attn_output.weight": random_orthogonal(UNTIED.d_model, seed=0),  # input: concatenated heads
        "blk.1.ffn_down.weight": random_orthogonal(UNTIED.n_ff, seed=1),  # input: silu(gate) * up
        "output.weight": random_orthogonal(UNTIED.d_model, seed=2),  # input: final norm
    }
    hooks = {name: (lambda x, r=r: x @ r.T) for name, r in rotations.items()}  # x rows: R·x

    def rotated_weights(name: str) -> np.ndarray:
        w = source.dequantize(name)
        return w @ rotations[name].numpy().T if name in rotations else w

    plain = np.concatenate(LlamaForward(source).logits(sequences))
    hooked_only = np.concatenate(LlamaForward(source, input_hooks=hooks).logits(sequences))
    rotated = np.concatenate(LlamaForward(source, weights=rotated_weights, input_hooks=hooks).logits(sequences))
    assert np.abs(hooked_only - plain).max() > 0.1
    np.testing.assert_allclose(rotated, plain, atol=1e-4)

    stats = LlamaForward(source, input_hooks={"blk.2.attn_q.weight": lambda x: 2 * x}).input_mean_squares(sequences)
    base = LlamaForward(source).input_mean_squares(sequences)
    np.testing.assert_allclose(stats["blk.2.attn_q.weight"], 4 * base["blk.2.attn_q.weight"], rtol=1e-6)
    np.testing.assert_array_equal(stats["blk.2.attn_k.weight"], base["blk.2.attn_k.weight"])


def test_weights_are_read_once_layer_by_layer(tiny_path: Path, sequences: list[list[int]]) -> None:
    """Memory flat in depth: every weight is read once, layer after layer, for all sequences at once."""
    source = TensorSource(tiny_path)
    order: list[str] = []

    def weights(name: str) -> np.ndarray:
        order.append(name)
        return source.dequantize(name)

    LlamaForward(source, weights=weights).logits(sequences)
    layers = [int(name.split(".")[1]) for name in order if name.startswith("blk.")]
    assert layers == sorted(layers) and len(layers) == 9 * TINY.n_layers
    assert order[0] == order[-1] == "token_embd.weight"  # the embedding first, the tied head last
    assert len(set(order)) == len(order) - 1 == len(source.infos)


def test_tied_head_hook_is_keyed_by_token_embd(tiny_path: Path, sequences: list[list[int]]) -> None:
    plain = LlamaForward(tiny_path).logits(sequences)
    doubled = LlamaForward(tiny_path, input_hooks={"token_embd.weight": lambda x: 2 * x}).logits(sequences)
    for a, b in zip(plain, doubled):
        np.testing.assert_allclose(b, 2 * a, rtol=1e-6, atol=1e-6)


# ---- config and refusals ------------------------------------------------------------------------


def test_config_of_default_model() -> None:
    layout = read_layout(default_model_path())
    assert supports_forward(layout)
    config = LlamaConfig.from_layout(layout)
    assert (config.n_layer, config.n_embd, config.n_ff, config.n_head, config.n_head_kv) == (30, 576, 1536, 9, 3)
    assert (config.head_dim, config.rope_dim, config.rope_base, config.vocab_size) == (64, 64, 100000.0, 49152)
    assert config.tied_embeddings and config.head_weight == "token_embd.weight"
    assert config.norm_eps == pytest.approx(1e-5)


def test_config_of_tiny_qwen2(qwen2_path: Path, qwen2_unbiased_path: Path) -> None:
    """Read from the qwen2.* keys; the biases are those the file has."""
    config = LlamaConfig.from_layout(read_layout(qwen2_path))
    assert (config.architecture, config.arch.rope_neox) == ("qwen2", True)
    assert config.biases == ("attn_q", "attn_k", "attn_v")
    assert (config.rope_base, config.norm_eps, config.n_head_kv) == (1e6, pytest.approx(1e-6), TINY.n_head_kv)
    assert config.tensor_shapes()["blk.1.attn_k.bias"] == (TINY.d_model // TINY.n_head * TINY.n_head_kv,)
    assert LlamaConfig.from_layout(read_layout(qwen2_unbiased_path)).biases == ()
    assert LlamaConfig.from_layout(read_layout(default_model_path())).arch.rope_neox is False


def test_qwen2_biases_and_rope_pairs_matter(qwen2_path: Path, sequences: list[list[int]]) -> None:
    """The matches with llama.cpp above could not hold with the biases dropped or the rope pairs of llama."""
    source = TensorSource(qwen2_path)
    plain = np.concatenate(LlamaForward(source).logits(sequences))
    zero_biases = np.concatenate(LlamaForward(source, weights=lambda name: source.dequantize(name) * (
        0 if name.endswith(".bias") else 1)).logits(sequences))
    assert np.abs(zero_biases - plain).max() > 100 * TINY_TOLERANCE
    config = LlamaConfig.from_layout(source.layout)
    with pytest.raises(ValueError, match="biases"):  # a caller that forgets them is told, not silently wrong
        llama_block(config, torch.zeros(2, TINY.d_model), torch.ones(TINY.d_model), torch.ones(TINY.d_model),
                    lambda part, x: x, torch.ones(2, 1, 8, dtype=torch.complex64), [torch.arange(2)[None]])


@pytest.mark.skipif(not YARDSTICK.exists(), reason="the 1.5B yardstick is not fetched (tools/fetch_yardstick.py)")
def test_config_of_the_qwen2_yardstick() -> None:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M: only its header is read."""
    config = LlamaConfig.from_layout(read_layout(YARDSTICK))
    assert (config.n_layer, config.n_embd, config.n_ff, config.n_head, config.n_head_kv) == (28, 1536, 8960, 12, 2)
    assert (config.head_dim, config.rope_base, config.vocab_size) == (128, 1e6, 151936)
    assert config.biases == ("attn_q", "attn_k", "attn_v") and not config.tied_embeddings


def test_other_architecture_is_refused(tiny_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "gemma.gguf"
    write_with_metadata(tiny_path, other, {"general.architecture": "gemma3"})
    assert not supports_forward(read_layout(other))
    with pytest.raises(UnsupportedModelError, match="architecture 'gemma3'") as err:
        LlamaForward(other)
    assert "\n" not in str(err.value)


def test_tensor_outside_plain_llama_is_refused(tiny_path: Path, tmp_path: Path) -> None:
    """A llama.cpp-optional bias would be silently ignored, so the forward refuses the file."""
    layout = read_layout(tiny_path)
    specs = llama_tensor_specs(TINY, LlamaConfig.from_layout(layout).vocab_size, GGMLQuantizationType.F32)
    specs.append(TensorSpec("blk.0.attn_output.bias", (TINY.d_model,), GGMLQuantizationType.F32))
    biased = tmp_path / "biased.gguf"
    write_gguf(biased, copy_metadata(layout), specs, lambda s: np.zeros(s.shape, np.float32))
    assert not supports_forward(read_layout(biased))
    with pytest.raises(UnsupportedModelError, match="blk.0.attn_output.bias"):
        LlamaForward(biased)


def test_bad_inputs_are_refused(tiny_path: Path) -> None:
    with pytest.raises(InputError, match="blk.0.attn_qkv.weight"):
        LlamaForward(tiny_path, input_hooks={"blk.0.attn_qkv.weight": lambda x: x})
    forward = LlamaForward(tiny_path)
    with pytest.raises(InputError, match="token ids"):
        forward.logits([[1, 2, forward.config.vocab_size]])
    with pytest.raises(InputError, match="non-empty"):
        forward.logits([[1, 2], []])
    with pytest.raises(InputError, match="shape"):
        LlamaForward(tiny_path, weights=lambda name: np.zeros((3, 3), np.float32)).logits([[1, 2]])
