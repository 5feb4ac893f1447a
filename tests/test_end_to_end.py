"""The core path on real parts: convert -> llama.cpp loads it -> star product == merged weights -> lower perplexity."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType, GGUFValueType

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.convert.calibrate import calibrate
from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.quantize import quantize_model, resolve_outtype
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.format.gguf_file import TensorSpec, Value, copy_metadata, read_layout, write_gguf
from nkat_gguf.format.nkat import read_theta
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.texts import builtin_text, load_text

EVAL_TEXT = builtin_text("evaluation").content[:40_000]


def plain_llama(path: Path, **kwargs: object) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, verbose=False, n_threads=2, **kwargs)


def test_tensors_are_llama_cpp_quantization_byte_for_byte(tiny_f32: Path, tmp_path: Path) -> None:
    """The output's tensors are exactly what llama_model_quantize writes with the same importance matrix."""
    out = tmp_path / "tiny.nkat.gguf"
    report = convert(ConvertOptions(input=tiny_f32, output=out, outtype="Q4_0", theta_rank=2, progress=False))
    assert report.imatrix == "calibration" and len(report.tensors) == 14
    source = TensorSource(tiny_f32)
    stats = calibrate(tiny_f32, load_text(None, "calibration"), progress=False).mean_squares
    plain = tmp_path / "plain.gguf"
    quantize_model(tiny_f32, plain, resolve_outtype("Q4_0", source.layout)[1], stats)
    ours, theirs = TensorSource(out), TensorSource(plain)
    assert [t.name for t in ours.layout.tensors] == [t.name for t in theirs.layout.tensors]
    for t in theirs.layout.tensors:
        assert np.array_equal(ours.raw(t.name), theirs.raw(t.name)), t.name
    # and stock llama.cpp generates the same text from both
    prompt = "The Python language"
    outputs = [plain_llama(p)(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"] for p in (out, plain)]
    assert outputs[0] == outputs[1]


def test_rank_zero_writes_no_theta(tiny_f32: Path, tmp_path: Path) -> None:
    out = tmp_path / "r0.gguf"
    convert(ConvertOptions(input=tiny_f32, output=out, outtype="Q8_0", theta_rank=0, progress=False))
    theta = read_theta(out)
    assert theta is not None and theta.rank == 0 and theta.tensors == {}
    assert not any(k.startswith("nkat.theta.blk") for k in read_layout(out).metadata)


def test_default_model_theta_lowers_perplexity(default_q4_0_rank8: Path) -> None:
    """On the evaluation split, theta on < theta off, and the Q4_1 reference is lower still."""
    with NkatRuntime(default_q4_0_rank8, RuntimeOptions(n_threads=2)) as rt:
        assert rt.has_theta and rt.theta.rank == 8 and len(rt.theta.tensors) == 210
        tokens = tokenize_text(rt.llm, EVAL_TEXT)
        rt.set_gamma(None)
        off = perplexity(rt.llm, tokens, 512, 3, progress=False).ppl
        rt.set_gamma(1.0)
        on = perplexity(rt.llm, tokens, 512, 3, progress=False).ppl
    with NkatRuntime(default_model_path(), RuntimeOptions(n_threads=2)) as ref:
        reference = perplexity(ref.llm, tokens, 512, 3, progress=False).ppl
    assert reference < on < off


def merged_f32(nkat: Path, dst: Path, gamma: float) -> Path:
    """W + γ·B·A for every theta weight, everything else as stored, all in F32: the star product folded."""
    source, theta = TensorSource(nkat), read_theta(nkat)
    dense = {n: t.dequantize() for n, t in theta.tensors.items()}
    specs = [TensorSpec(t.name, tuple(reversed(t.shape)), GGMLQuantizationType.F32) for t in source.layout.tensors]
    metadata = {k: v for k, v in copy_metadata(source.layout).items() if not k.startswith("nkat.")}
    metadata["general.file_type"] = Value(GGUFValueType.UINT32, 0)

    def produce(spec: TensorSpec) -> np.ndarray:
        w = source.dequantize(spec.name)
        return w + gamma * (dense[spec.name].b @ dense[spec.name].a) if spec.name in dense else w

    write_gguf(dst, metadata, specs, produce)
    return dst


@pytest.mark.slow
def test_star_product_in_llama_cpp_equals_merged_weights(tmp_path: Path) -> None:
    """On an F32 base (Q4_0 weights dequantized, the Q4_1 model as reference), theta applied by llama.cpp
    as an adapter at γ gives the logits of a model whose weights are W + γ·B·A."""
    q4_0 = tmp_path / "q4_0.gguf"
    quantize_model(default_model_path(), q4_0, resolve_outtype("Q4_0", read_layout(default_model_path()))[1])
    nkat = tmp_path / "f32.nkat.gguf"
    convert(ConvertOptions(input=q4_0, output=nkat, outtype="F32", reference=default_model_path(), theta_rank=4,
                           imatrix="none", selective_layers=["blk.*"], progress=False))
    gamma = 0.8
    merged = merged_f32(nkat, tmp_path / "merged.gguf", gamma)
    tokens = tokenize_text(plain_llama(merged, vocab_only=True), EVAL_TEXT[:1500])[:96]
    with NkatRuntime(nkat, RuntimeOptions(n_threads=2, f32_kv_cache=True, logits_all=True)) as rt:
        rt.set_gamma(gamma)
        rt.llm.eval(tokens)
        star = np.array(rt.llm.scores[: len(tokens)])
        rt.set_gamma(None)
        rt.llm.eval(tokens)
        without = np.array(rt.llm.scores[: len(tokens)])
    folded_llm = plain_llama(merged, logits_all=True, type_k=0, type_v=0)
    folded_llm.eval(tokens)
    folded = np.array(folded_llm.scores[: len(tokens)])
    assert np.abs(star - folded).max() < 2e-3
    assert np.abs(without - folded).max() > 50 * np.abs(star - folded).max()  # theta visibly matters
