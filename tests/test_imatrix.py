"""The importance matrix: llama.cpp imatrix files read as llama-quantize reads them, and its effect in llama.cpp.

The files are written here in the documented layouts (GGUF with gguf-py, legacy .dat with struct),
never with nkat-gguf's own code, so the reader is checked against the format, not against itself.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.engine.llama.quantize import outtypes, quantize_model
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.imatrix import input_widths, missing_note, read_imatrix_file
from nkat_gguf.format.tensors import TensorSource

Q4_0 = outtypes()["Q4_0"]


def write_gguf_imatrix(path: Path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray],
                       general_type: str = "imatrix") -> Path:
    """As llama-imatrix's save_imatrix: sums (n_mat, n_in) as `.in_sum2`, counts (n_mat, 1) as `.counts`."""
    writer = gguf.GGUFWriter(path, arch="llama")  # gguf-py always adds general.architecture; harmless
    writer.add_string("general.type", general_type)
    writer.add_array("imatrix.datasets", ["calibration.txt"])
    writer.add_uint32("imatrix.chunk_count", 4)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name in sorted(sums):
        writer.add_tensor(name + ".in_sum2", np.asarray(sums[name], dtype=np.float32))
        writer.add_tensor(name + ".counts", np.asarray(counts[name], dtype=np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_dat_imatrix(path: Path, entries: dict[str, tuple[int, np.ndarray]], trailer: bool = True) -> Path:
    """As llama-imatrix's save_imatrix_legacy: per entry name, ncall, nval, values = mean * ncall."""
    out = [struct.pack("<i", len(entries))]
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, len(values)),
                np.asarray(values, dtype="<f4").tobytes()]
    if trailer:
        dataset = b"calibration.txt"
        out += [struct.pack("<i", 4), struct.pack("<i", len(dataset)), dataset]
    path.write_bytes(b"".join(out))
    return path


def random_means(widths: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Strongly uneven column importances for every block weight, as real activations have."""
    rng = np.random.default_rng(seed)
    return {n: rng.lognormal(0.0, 2.0, k).astype(np.float32) for n, k in widths.items() if n.startswith("blk.")}


def tensor_data(path: Path) -> tuple[list, bytes]:
    """Tensor infos and the whole tensor data section: what must match 'byte for byte'."""
    layout = read_layout(path)
    with open(path, "rb") as fh:
        fh.seek(layout.data_offset)
        return layout.tensors, fh.read()


@pytest.fixture(scope="module")
def widths(tiny_f32: Path) -> dict[str, int]:
    return input_widths(read_layout(tiny_f32))


# ---- reading llama.cpp's files ------------------------------------------------------------------


def test_gguf_imatrix_is_sums_over_counts(tmp_path: Path, widths: dict[str, int]) -> None:
    means = random_means(widths)
    tokens = {n: np.array([1000.0 + i]) for i, n in enumerate(means)}
    path = write_gguf_imatrix(tmp_path / "imatrix.gguf", {n: (m * tokens[n])[None, :] for n, m in means.items()},
                              tokens)
    read = read_imatrix_file(path, widths)
    assert read.keys() == means.keys()
    for name, m in means.items():
        np.testing.assert_allclose(read[name], m, rtol=1e-6)


def test_gguf_imatrix_expert_stack_unseen_expert_is_ones(tmp_path: Path) -> None:
    """n_mat > 1 (a MoE expert stack): per-expert counts; an expert never routed to gets 1s, as llama-quantize."""
    sums = np.array([[2.0, 4.0, 6.0], [5.0, 5.0, 5.0]])
    path = write_gguf_imatrix(tmp_path / "moe.gguf", {"blk.0.ffn_up_exps.weight": sums},
                              {"blk.0.ffn_up_exps.weight": np.array([2.0, 0.0])})
    read = read_imatrix_file(path, {"blk.0.ffn_up_exps.weight": 6})
    np.testing.assert_array_equal(read["blk.0.ffn_up_exps.weight"], [1.0, 2.0, 3.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("trailer", [True, False])
def test_dat_imatrix_is_values_over_ncall(tmp_path: Path, widths: dict[str, int], trailer: bool) -> None:
    means = random_means(widths)
    names = sorted(means)
    entries = {n: (7, means[n] * 7) for n in names[1:]}
    entries[names[0]] = (0, means[names[0]])  # ncall 0: llama-quantize takes the values as they are
    read = read_imatrix_file(write_dat_imatrix(tmp_path / "imatrix.dat", entries, trailer), widths)
    assert read.keys() == means.keys()
    for name, m in means.items():
        np.testing.assert_allclose(read[name], m, rtol=1e-6)


def test_partial_imatrix_is_a_note_not_an_error(tmp_path: Path, widths: dict[str, int]) -> None:
    means = random_means(widths)
    del means["blk.1.ffn_down.weight"]
    path = write_dat_imatrix(tmp_path / "partial.dat", {n: (1, m) for n, m in means.items()})
    read = read_imatrix_file(path, widths)
    note = missing_note(path, read, widths)
    assert note is not None and "no entry for 1 of 14 weights (e.g. blk.1.ffn_down.weight)" in note
    # token_embd.weight is never in llama-imatrix output, so a complete file gets no note
    assert missing_note(path, random_means(widths), widths) is None


@pytest.fixture
def bad(tmp_path: Path, widths: dict[str, int], tiny_f32: Path) -> dict[str, tuple[Path, str]]:
    """Broken or mismatched imatrix files, and what the error for each must say."""
    means = random_means(widths)
    ones = {n: np.ones(1) for n in means}
    text = tmp_path / "notes.txt"
    text.write_text("this is not an importance matrix\n" * 20)
    truncated = write_dat_imatrix(tmp_path / "short.dat", {"blk.0.attn_q.weight": (1, np.ones(64))})
    truncated.write_bytes(truncated.read_bytes()[:40])
    nan = dict(means, **{"blk.0.attn_q.weight": np.full(widths["blk.0.attn_q.weight"], np.nan, np.float32)})
    negative = {n: (1, -m if n == "blk.0.attn_k.weight" else m) for n, m in means.items()}
    return {
        "text": (text, "not an imatrix file"),
        "model": (tiny_f32, "general.type 'model'"),
        "truncated": (truncated, "runs past the end"),
        "wrong_name": (write_dat_imatrix(tmp_path / "name.dat", {"blk.9.attn_q.weight": (1, np.ones(64))}),
                       "not weights of this model (e.g. blk.9.attn_q.weight)"),
        "wrong_size": (write_gguf_imatrix(tmp_path / "size.gguf", {n: np.ones((1, 32)) for n in means}, ones),
                       "has 32 values but the weight's input width is"),
        "nan": (write_gguf_imatrix(tmp_path / "nan.gguf", {n: m[None, :] for n, m in nan.items()}, ones),
                "invalid value nan"),
        "inf": (write_dat_imatrix(tmp_path / "inf.dat", {"blk.0.attn_q.weight": (1, np.full(64, np.inf))}),
                "invalid value inf"),
        "negative": (write_dat_imatrix(tmp_path / "negative.dat", negative), "blk.0.attn_k.weight has an invalid"),
    }


def test_bad_files_raise_one_line_input_errors(bad: dict[str, tuple[Path, str]], widths: dict[str, int]) -> None:
    for case, (path, message) in bad.items():
        with pytest.raises(InputError) as info:
            read_imatrix_file(path, widths)
        assert message in str(info.value), case
        assert "\n" not in str(info.value), case


# ---- the importance matrix reaches llama.cpp ------------------------------------------------------


def test_importance_matrix_changes_weights_and_lowers_weighted_error(tmp_path: Path, tiny_f32: Path,
                                                                     widths: dict[str, int]) -> None:
    """Σ_j imp_j·(W−Ŵ)²_ij is what llama.cpp minimizes with an imatrix: it must drop on every weight."""
    means = random_means(widths)
    quantize_model(tiny_f32, tmp_path / "plain.gguf", Q4_0)
    quantize_model(tiny_f32, tmp_path / "imatrix.gguf", Q4_0, means)
    ref, plain, weighted = TensorSource(tiny_f32), TensorSource(tmp_path / "plain.gguf"), TensorSource(tmp_path / "imatrix.gguf")
    for name, importance in means.items():
        w = ref.dequantize(name)
        err_plain = float(((w - plain.dequantize(name)) ** 2 * importance).sum())
        err_weighted = float(((w - weighted.dequantize(name)) ** 2 * importance).sum())
        assert err_weighted < 0.9 * err_plain, name


def test_imatrix_none_is_plain_quantization_byte_for_byte(tmp_path: Path, tiny_f32: Path) -> None:
    quantize_model(tiny_f32, tmp_path / "plain.gguf", Q4_0)
    convert(ConvertOptions(input=tiny_f32, output=tmp_path / "none.gguf", outtype="Q4_0", theta_rank=0,
                           imatrix="none", progress=False))
    assert tensor_data(tmp_path / "none.gguf") == tensor_data(tmp_path / "plain.gguf")
    assert read_layout(tmp_path / "none.gguf").get("nkat.imatrix") == "none"


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_imatrix_file_reaches_llama_cpp(tmp_path: Path, tiny_f32: Path, widths: dict[str, int], fmt: str) -> None:
    """convert --imatrix FILE quantizes exactly as quantize_model with the file's means."""
    means = random_means(widths)
    del means["blk.0.attn_v.weight"]  # a partial file: that weight is quantized without one, with a note
    if fmt == "gguf":  # token counts that are powers of two make sum / count exactly the mean
        path = write_gguf_imatrix(tmp_path / "imatrix.gguf", {n: 4 * m[None, :] for n, m in means.items()},
                                  {n: np.array([4.0]) for n in means})
    else:
        path = write_dat_imatrix(tmp_path / "imatrix.dat", {n: (2, 2 * m) for n, m in means.items()})
    quantize_model(tiny_f32, tmp_path / "direct.gguf", Q4_0, means)
    report = convert(ConvertOptions(input=tiny_f32, output=tmp_path / "out.gguf", outtype="Q4_0", theta_rank=0,
                                    imatrix=str(path), progress=False))
    assert tensor_data(tmp_path / "out.gguf") == tensor_data(tmp_path / "direct.gguf")
    assert report.imatrix == read_layout(tmp_path / "out.gguf").get("nkat.imatrix") == f"file:{path.name}"
    assert any("blk.0.attn_v.weight" in note for note in report.notes)


def test_bad_imatrix_is_one_line_from_the_cli(tmp_path: Path, bad: dict[str, tuple[Path, str]],
                                              tiny_f32: Path) -> None:
    cli = Path(sys.executable).with_name("nkat-gguf")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for case in ("wrong_name", "wrong_size", "nan"):
        path, message = bad[case]
        run = subprocess.run([str(cli), "convert", "--input", str(tiny_f32), "--output", str(out_dir / "x.gguf"),
                              "--outtype", "Q4_0", "--theta-rank", "0", "--imatrix", str(path)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0, case
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], (case, run.stderr)
        assert list(out_dir.iterdir()) == [], case
