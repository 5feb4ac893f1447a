"""Units of the bad-input checks (the corpus runs them all through the CLI): each refuses with a line that
names the problem, and valid files still pass."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGUFValueType

from nkat_gguf.cli.output import emit
from nkat_gguf.engine.llama.probe import check_loadable, probe_load
from nkat_gguf.engine.serve.server import RequestError, check_request
from nkat_gguf.errors import InputError, NkatError
from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import Value, read_layout, write_with_metadata
from nkat_gguf.format.hparams import check_context, check_hparams
from nkat_gguf.format.nkat import read_theta


def edited(src: Path, dst: Path, **changes: Value) -> Path:
    write_with_metadata(src, dst, {k.replace("__", "."): v for k, v in changes.items()})
    return dst


def test_an_abort_inside_llama_cpp_becomes_one_line(tiny_f32: Path, tmp_path: Path) -> None:
    bad = edited(tiny_f32, tmp_path / "b.gguf", llama__block_count=Value(GGUFValueType.UINT32, 0))
    with pytest.raises(InputError, match=r"aborts \(SIGABRT\).*GGML_ASSERT\(hparams.n_layer_all > 0"):
        probe_load(bad)  # the child died; this process did not
    with pytest.raises(InputError, match="block_count is 0; llama.cpp needs 1 to 512"):
        check_loadable(bad)  # the pure check names it before any load
    probe_load(tiny_f32)


def test_llama_cpp_refusals_carry_its_own_reason(tiny_f32: Path, tmp_path: Path) -> None:
    bad = edited(tiny_f32, tmp_path / "a.gguf", general__architecture=Value(GGUFValueType.STRING, "nkat-no-arch"))
    with pytest.raises(InputError, match="unknown model architecture: 'nkat-no-arch'"):
        check_loadable(bad)


@pytest.mark.parametrize("key, value, words", [
    ("llama.attention.head_count_kv", Value(GGUFValueType.UINT32, 3), "not a multiple"),
    ("llama.embedding_length", Value(GGUFValueType.UINT32, 63), "not a multiple"),
    ("llama.block_count", Value(GGUFValueType.STRING, "2"), "expected UINT32"),
    ("llama.rope.freq_base", Value(GGUFValueType.FLOAT32, float("nan")), "finite"),
    ("llama.expert_count", Value(GGUFValueType.UINT32, 5000), "expert_count"),
])
def test_hyperparameters_llama_cpp_asserts_on(tiny_f32: Path, tmp_path: Path, key: str, value: Value,
                                              words: str) -> None:
    check_hparams(read_layout(tiny_f32))
    write_with_metadata(tiny_f32, tmp_path / "h.gguf", {key: value})
    with pytest.raises(InputError, match=words):
        check_hparams(read_layout(tmp_path / "h.gguf"))


def test_context_is_bounded_by_the_trained_one(tiny_f32: Path) -> None:
    check_context(read_layout(tiny_f32), 2048)
    with pytest.raises(InputError, match="exceeds tiny-f32.gguf's trained context of 2048"):
        check_context(read_layout(tiny_f32), 1_000_000_000)


@pytest.mark.parametrize("value, words", [(Value(GGUFValueType.UINT32, 0), "not a power of two"),
                                          (Value(GGUFValueType.STRING, "32"), "requires UINT32"),
                                          (Value(GGUFValueType.FLOAT32, float("nan")), "requires UINT32")])
def test_alignment_is_checked(tiny_f32: Path, tmp_path: Path, value: Value, words: str) -> None:
    write_with_metadata(tiny_f32, tmp_path / "al.gguf", {"general.alignment": value})
    with pytest.raises(InputError, match=words):
        read_layout(tmp_path / "al.gguf")


def _with_first_tensor_info(src: Path, dst: Path, n_dims: int, dims: tuple[int, ...]) -> Path:
    layout = read_layout(src)
    raw = bytearray(src.read_bytes())
    pos = layout.tensor_infos_span[0]
    (n,) = struct.unpack_from("<Q", raw, pos)
    dims_at = pos + 8 + n
    struct.pack_into("<I", raw, dims_at, n_dims)
    struct.pack_into(f"<{len(dims)}Q", raw, dims_at + 4, *dims)
    dst.write_bytes(bytes(raw))
    return dst


def test_tensor_infos_bound_dimensions_and_overflow(tiny_f32: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="4294967295 dimensions"):
        read_layout(_with_first_tensor_info(tiny_f32, tmp_path / "d.gguf", 2**32 - 1, ()))
    with pytest.raises(InputError, match="overflows 64 bits"):  # 2^32 x 2^32 wraps to 0 in int64
        read_layout(_with_first_tensor_info(tiny_f32, tmp_path / "o.gguf", 2, (1 << 32, 1 << 32)))


def test_theta_element_types_and_scales_are_exact(tiny_nkat: Path, tmp_path: Path) -> None:
    name = read_theta(tiny_nkat).tensors and sorted(read_theta(tiny_nkat).tensors)[0]
    key_a, key_scale = f"{nkat.THETA_PREFIX}{name}.a", f"{nkat.THETA_PREFIX}{name}.a_scale"
    layout = read_layout(tiny_nkat)
    as_float = np.full(layout.get(key_a).shape, 300.0, dtype=np.float32)
    write_with_metadata(tiny_nkat, tmp_path / "f.gguf", {key_a: as_float})
    with pytest.raises(InputError, match="must be an array of INT8, got an array of FLOAT32"):
        read_theta(tmp_path / "f.gguf")
    for bad in (np.nan, np.inf, 1e6, -1.0):
        scales = layout.get(key_scale).copy()
        scales[0] = bad
        write_with_metadata(tiny_nkat, tmp_path / "s.gguf", {key_scale: scales})
        with pytest.raises(InputError, match="a theta scale must be finite and in"):
            read_theta(tmp_path / "s.gguf")
    write_with_metadata(tiny_nkat, tmp_path / "r.gguf", {nkat.THETA_RANK: Value(GGUFValueType.STRING, "4")})
    with pytest.raises(InputError, match="nkat.theta.rank must be a whole number"):
        read_theta(tmp_path / "r.gguf")


def test_no_result_with_nan_is_printed(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(NkatError, match="non-finite value at perplexity.theta.ppl"):
        emit({"perplexity": {"theta": {"ppl": float("nan")}}}, True, str)
    with pytest.raises(NkatError, match="runs.1"):
        emit({"runs": [1.0, float("inf")]}, False, str)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "nkat_gamma": 99}, "out of range"),
    ({"messages": [{"role": "user", "content": 3}]}, "content"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
])
def test_server_requests_are_checked(body: dict, words: str) -> None:
    with pytest.raises(RequestError, match=words):
        check_request(body, n_ctx=512)
    check_request({"messages": [{"role": "user", "content": "x"}], "max_tokens": 8}, n_ctx=512)
