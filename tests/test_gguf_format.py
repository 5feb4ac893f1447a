"""The byte-level GGUF reader/writer and the NKAT metadata format, checked against gguf-py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from nkat_gguf.errors import InputError
from nkat_gguf.format import nkat as fmt
from nkat_gguf.format.gguf_file import read_layout, write_with_metadata
from nkat_gguf.format.nkat import NkatTheta, read_theta, theta_metadata
from nkat_gguf.math.theta import LowRank, quantize_int8

RNG = np.random.default_rng(3)


@pytest.fixture()
def gguf_py_file(tmp_path: Path) -> Path:
    """A file written by gguf-py with every kind of value and two tensors."""
    path = tmp_path / "ref.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("t.u32", 7)
    w.add_int32("t.i32", -5)
    w.add_float32("t.f32", 0.25)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_uint64("t.u64", 2**40)
    w.add_array("t.strs", ["a", "bc", ""])
    w.add_key_value("t.i8s", [-128, 0, 127], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT8)
    w.add_key_value("t.f32s", [1.5, -2.0], GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    w.add_tensor("w", RNG.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("v", RNG.standard_normal(16).astype(np.float16))
    w.add_tensor("u", RNG.standard_normal((8, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reader_agrees_with_gguf_py(gguf_py_file: Path) -> None:
    layout = read_layout(gguf_py_file)
    assert layout.get("general.architecture") == "llama"
    assert layout.get("t.u32") == 7 and layout.get("t.i32") == -5 and layout.get("t.bool") is True
    assert layout.get("t.f32") == 0.25 and layout.get("t.f64") == 1e-300 and layout.get("t.u64") == 2**40
    assert layout.get("t.str") == "héllo" and layout.get("t.strs") == ["a", "bc", ""]
    assert layout.get("t.i8s").dtype == np.int8 and layout.get("t.i8s").tolist() == [-128, 0, 127]
    assert layout.get("t.f32s").tolist() == [1.5, -2.0]
    reader = GGUFReader(str(gguf_py_file))
    assert [(t.name, tuple(t.shape)) for t in layout.tensors] == [(t.name, tuple(int(x) for x in t.shape))
                                                                 for t in reader.tensors]
    assert layout.data_offset == reader.data_offset


def test_a_layout_is_read_once_and_again_when_its_bytes_change(gguf_py_file: Path) -> None:
    """A second read of the same file is the kept layout; a value rewritten in place at the same size (a
    timestamp may not tell) is read anew, and so is a change to the tensor data's length."""
    first = read_layout(gguf_py_file)
    assert read_layout(gguf_py_file) is first
    raw = bytearray(gguf_py_file.read_bytes())
    at = raw.index("héllo".encode())
    raw[at:at + 1] = b"j"
    gguf_py_file.write_bytes(raw)
    assert read_layout(gguf_py_file).get("t.str") == "jéllo"
    gguf_py_file.write_bytes(raw[:-4])
    with pytest.raises(InputError, match="truncated|tensor data"):
        read_layout(gguf_py_file)


def test_metadata_rewrite_keeps_tensors_byte_for_byte(gguf_py_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    values = RNG.integers(-127, 128, 100_000).astype(np.int8)
    write_with_metadata(gguf_py_file, out, {"x.i8": values, "t.u32": 9, "x.s": "new"})
    before, after = GGUFReader(str(gguf_py_file)), GGUFReader(str(out))
    for t0, t1 in zip(before.tensors, after.tensors, strict=True):
        assert t0.name == t1.name and t0.tensor_type == t1.tensor_type
        assert t0.data.tobytes() == t1.data.tobytes()
    assert after.fields["x.i8"].types == [GGUFValueType.ARRAY, GGUFValueType.INT8]
    assert np.array_equal(np.concatenate([after.fields["x.i8"].parts[i] for i in after.fields["x.i8"].data]), values)
    assert after.fields["t.u32"].contents() == 9 and after.fields["x.s"].contents() == "new"
    assert after.fields["t.str"].contents() == "héllo"


def test_not_a_gguf_and_truncated_files_are_refused(gguf_py_file: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not a model\n" * 10)
    with pytest.raises(InputError, match="not a GGUF"):
        read_layout(text)
    raw = gguf_py_file.read_bytes()
    for cut in (30, len(raw) - 10):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(raw[:cut])
        with pytest.raises(InputError, match="truncated"):
            read_layout(short)


def make_theta(shapes: dict[str, tuple[int, int]], rank: int | dict[str, int]) -> NkatTheta:
    ranks = rank if isinstance(rank, dict) else dict.fromkeys(shapes, rank)
    tensors = {n: quantize_int8(LowRank(RNG.standard_normal((o, ranks[n])).astype(np.float32),
                                        RNG.standard_normal((ranks[n], i)).astype(np.float32)))
               for n, (o, i) in shapes.items()}
    return NkatTheta(0.97, tensors, {"nkat.outtype": "Q4_0"})


def assert_same_theta(back: NkatTheta | None, theta: NkatTheta) -> None:
    assert back is not None and back.ranks == theta.ranks and back.gamma == pytest.approx(theta.gamma)
    for name, t in theta.tensors.items():
        for part in fmt.PARTS:
            assert np.array_equal(getattr(back.tensors[name], part), getattr(t, part)), (name, part)


def test_nkat_writer_and_reader_round_trip_and_gguf_py_reads_int8(gguf_py_file: Path, tmp_path: Path) -> None:
    theta = make_theta({"w": (3, 64)}, rank=2)
    out = tmp_path / "nkat.gguf"
    write_with_metadata(gguf_py_file, out, theta_metadata(theta))
    back = read_theta(out)
    assert_same_theta(back, theta)
    assert back.rank == 2 and back.provenance == {"nkat.outtype": "Q4_0"}
    fields = GGUFReader(str(out)).fields
    assert fields["nkat.theta.w.a"].types == [GGUFValueType.ARRAY, GGUFValueType.INT8]
    assert fields["nkat.theta.w.b_scale"].types == [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]
    assert fields["nkat.version"].types == [GGUFValueType.UINT32] and fields["nkat.version"].contents() == 2
    assert back.digest() == theta.digest()


def test_v2_per_weight_ranks_with_rank_zero_weights_left_out(gguf_py_file: Path, tmp_path: Path) -> None:
    """Two weights of different ranks and one (v) with rank 0; gguf-py reads the ranks as UINT32."""
    theta = make_theta({"w": (3, 64), "u": (8, 32)}, rank={"w": 3, "u": 1})
    out = tmp_path / "v2.gguf"
    write_with_metadata(gguf_py_file, out, theta_metadata(theta))
    back = read_theta(out)
    assert_same_theta(back, theta)
    assert back.ranks == {"u": 1, "w": 3} and back.rank == 3 and "v" not in back.tensors
    fields = GGUFReader(str(out)).fields
    assert fields[fmt.THETA_RANKS].types == [GGUFValueType.ARRAY, GGUFValueType.UINT32]
    assert fields[fmt.THETA_RANKS].contents() == [1, 3] and fields[fmt.THETA_TENSORS].contents() == ["u", "w"]
    assert fields[fmt.THETA_RANK].contents() == 3
    assert theta.metadata_bytes() == 3 * (3 + 64) + 1 * (8 + 32) + 4 * 2 * (3 + 1)
    assert make_theta({"w": (3, 64)}, {"w": 2}).digest() != make_theta({"w": (3, 64)}, {"w": 1}).digest()


def test_no_theta_round_trips_as_rank_zero(gguf_py_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "none.gguf"
    write_with_metadata(gguf_py_file, out, theta_metadata(NkatTheta(0.97, {})))
    back = read_theta(out)
    assert back is not None and back.tensors == {} and back.rank == 0


def write_v1(src: Path, dst: Path, theta: NkatTheta) -> None:
    """A version 1 file written by gguf-py itself: one rank for all, no nkat.theta.ranks."""
    reader = GGUFReader(str(src))
    w = GGUFWriter(str(dst), "llama")
    w.add_uint32("nkat.version", 1)
    w.add_uint32("nkat.theta.rank", theta.rank)
    w.add_float32("nkat.theta.gamma", theta.gamma)
    w.add_array("nkat.theta.tensors", sorted(theta.tensors))
    for name, t in sorted(theta.tensors.items()):
        for part, sub in (("a", GGUFValueType.INT8), ("a_scale", GGUFValueType.FLOAT32),
                          ("b", GGUFValueType.INT8), ("b_scale", GGUFValueType.FLOAT32)):
            w.add_key_value(f"nkat.theta.{name}.{part}", getattr(t, part).ravel().tolist(), GGUFValueType.ARRAY,
                            sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_v1_files_still_read(gguf_py_file: Path, tmp_path: Path) -> None:
    theta = make_theta({"w": (3, 64), "u": (8, 32)}, rank=2)
    out = tmp_path / "v1.gguf"
    write_v1(gguf_py_file, out, theta)
    assert_same_theta(read_theta(out), theta)


def test_reader_checks_shapes_against_the_model(gguf_py_file: Path, tmp_path: Path) -> None:
    wrong = make_theta({"w": (64, 3)}, rank=2)  # transposed: sizes no longer fit the tensor
    out = tmp_path / "bad.gguf"
    write_with_metadata(gguf_py_file, out, theta_metadata(wrong))
    with pytest.raises(InputError, match="expected"):
        read_theta(out)
    absent = make_theta({"nope": (3, 64)}, rank=2)
    write_with_metadata(gguf_py_file, out, theta_metadata(absent))
    with pytest.raises(InputError, match="not a 2-D tensor"):
        read_theta(out)
    assert read_theta(gguf_py_file) is None


@pytest.mark.parametrize(("ranks", "message"), [
    (np.array([2], np.uint32), "nkat.theta.ranks has 1 elements but nkat.theta.tensors lists 2 weights"),
    (np.array([0, 2], np.uint32), r"nkat.theta.ranks\[0\] = 0 for u, below 1"),
    # u's arrays hold rank 2, not 1
    (np.array([1, 3], np.uint32), r"nkat.theta.u.a_scale has 2 elements \(rank 2\) but nkat.theta.ranks gives u rank 1"),
    (np.array([2, 2], np.uint32), "nkat.theta.rank = 3 but the largest of nkat.theta.ranks is 2"),
])
def test_reader_checks_the_ranks(gguf_py_file: Path, tmp_path: Path, ranks: np.ndarray, message: str) -> None:
    metadata = theta_metadata(make_theta({"w": (3, 64), "u": (8, 32)}, rank=2))
    metadata[fmt.THETA_RANKS] = ranks
    metadata[fmt.THETA_RANK] = 3  # the largest the ranks above state (the rank-2 factors say otherwise)
    out = tmp_path / "ranks.gguf"
    write_with_metadata(gguf_py_file, out, metadata)
    with pytest.raises(InputError, match=message):
        read_theta(out)


def test_unknown_version_is_refused(gguf_py_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "v9.gguf"
    write_with_metadata(gguf_py_file, out, theta_metadata(make_theta({"w": (3, 64)}, 1)) | {fmt.VERSION: 9})
    with pytest.raises(InputError, match="nkat.version = 9: this NKAT format version is not supported"):
        read_theta(out)


@pytest.mark.parametrize(("changes", "message"), [
    ({fmt.THETA_RANK: 0}, "nkat.theta.rank = 0 \\(no theta\\) but nkat.theta.tensors lists 2 weights"),
    ({fmt.THETA_TENSORS: ["u"], fmt.THETA_RANKS: np.array([2], np.uint32)},
     "nkat.theta.w.a holds factors for w, which nkat.theta.tensors does not list"),
    ({fmt.THETA_TENSORS: ["u", "u"]}, "nkat.theta.tensors lists u twice"),
    ({fmt.VERSION: 1}, "nkat.theta.ranks is a version 2 key, but nkat.version = 1"),
    ({"nkat.theta.w.rank": 2}, "nkat.theta.w.rank is not a key of the NKAT format"),
])
def test_reader_refuses_a_file_that_says_two_things(gguf_py_file: Path, tmp_path: Path, changes: dict,
                                                     message: str) -> None:
    """docs/NKAT_FORMAT.md, "Consistency": each contradiction named by both of its keys."""
    out = tmp_path / "two.gguf"
    write_with_metadata(gguf_py_file, out, theta_metadata(make_theta({"w": (3, 64), "u": (8, 32)}, rank=2)) | changes)
    with pytest.raises(InputError, match=message):
        read_theta(out)


def test_v1_file_without_its_rank_is_refused(gguf_py_file: Path, tmp_path: Path) -> None:
    src = tmp_path / "v1.gguf"
    write_v1(gguf_py_file, src, make_theta({"w": (3, 64)}, rank=2))
    out = tmp_path / "v1-no-rank.gguf"
    write_with_metadata(src, out, {}, drop_prefixes=(fmt.THETA_RANK,))
    with pytest.raises(InputError, match="nkat.theta.rank missing: NKAT version 1 requires"):
        read_theta(out)
