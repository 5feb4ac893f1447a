"""The corpus: every class of malformed input the tool has met, each with the command that reads it.

Structure (magic, version, counts, lengths, truncation, tensor infos, alignment), hyperparameters llama.cpp
asserts on, theta (types, NaN/inf/huge scales, sizes), importance matrices, SO8T checkpoints, options
validated before work, and valid controls that must pass through the same harness.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGUFValueType

from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import Value
from tests.corpus.generate import (
    Case,
    Parts,
    array,
    bytes_file,
    cut_end,
    f32,
    imatrix_gguf,
    info_fields,
    info_patch,
    kv_patch,
    legacy_imatrix,
    patch,
    raw_edit,
    safetensors_file,
    scale_set,
    string,
    theta_key,
    theta_part,
    truncated,
    truncated_at,
    u32,
    with_metadata,
)

PPL = ("perplexity", "-m", "{file}", "--ctx", "64", "--chunks", "1", "--threads", "1")
# every command that opens a model, to spread the structural cases over all of them
READERS = (
    PPL,
    ("export", "adapter", "{file}", "-o", "{out}/a.gguf"),
    ("export", "kobold", "{file}", "--output-dir", "{out}/k"),
    ("export", "ollama", "{file}", "--output-dir", "{out}/o"),
    ("bench", "-m", "{file}", "--n-prompt", "8", "--n-gen", "4", "-r", "1", "--threads", "1"),
    ("compare", "-m", "{file}", "--ctx", "64", "--chunks", "1", "-r", "1", "--threads", "1"),
    ("convert", "--input", "{file}", "--output", "{out}/c.gguf", "--theta-rank", "2", "--imatrix", "none",
     "--threads", "1"),
    ("qc", "bake", "--pre", "{file}", "--post", "{file}"),
)
ADAPTER = ("export", "adapter", "{file}", "-o", "{out}/a.gguf")
THETA_READERS = (
    PPL,
    ADAPTER,
    ("export", "kobold", "{file}", "--output-dir", "{out}/k"),
    ("export", "ollama", "{file}", "--output-dir", "{out}/o"),
    ("compare", "-m", "{file}", "--ctx", "64", "--chunks", "1", "-r", "1", "--threads", "1"),
    ("bench", "-m", "{file}", "--n-prompt", "8", "--n-gen", "4", "-r", "1", "--threads", "1"),
)
CONVERT = ("convert", "--input", "{tiny}", "--output", "{out}/c.gguf", "--theta-rank", "2", "--threads", "1")
CONVERT_FILE = ("convert", "--input", "{file}") + CONVERT[3:]
Q = "blk.0.attn_q.weight"


def spread(prefix: str, builds: list[tuple[str, object, str]], readers: tuple = READERS) -> list[Case]:
    """One case per malformed file, the commands taken in turn so that every reader meets every class."""
    return [Case(f"{prefix}-{name}", readers[i % len(readers)], expect, build)
            for i, (name, build, expect) in enumerate(builds)]


def _duplicate_key(parts: Parts) -> bytes:
    parts.kvs.append(parts.kvs[0])
    return parts.assemble()


def _duplicate_tensor(parts: Parts) -> bytes:
    parts.infos[1] = parts.infos[0][:]
    return parts.assemble()


def _huge_dims(parts: Parts) -> bytes:
    info = parts.infos[0]
    _, dim0, _, _ = info_fields(info)
    info[dim0:dim0 + 16] = (1 << 32).to_bytes(8, "little") * 2
    return parts.assemble()


def _bad_row(parts: Parts) -> bytes:
    info = parts.infos[0]  # token_embd.weight, Q4_0: rows must be whole 32-element blocks
    _, dim0, _, _ = info_fields(info)
    info[dim0:dim0 + 8] = (33).to_bytes(8, "little")
    return parts.assemble()


def _kv_count(n: int) -> object:
    return raw_edit(lambda parts: parts.assemble(n_kv=n))


def _tensor_count(n: int) -> object:
    return raw_edit(lambda parts: parts.assemble(n_tensors=n))


STRUCTURE = [
    ("empty", bytes_file(b""), "(0 bytes, less than the 24 of a gguf header)"),
    ("text", bytes_file(b"plain text, not a model\n" * 40), "magic b'plai', expected b'gguf'"),
    ("magic", bytes_file(b"GGUX" + bytes(100)), "magic b'ggux', expected b'gguf'"),
    ("magic-lower", bytes_file(b"gguf" + bytes(100)), "magic b'gguf', expected b'gguf'"),
    ("version-0", patch(4, "<I", 0), "unsupported gguf version 0"),
    ("version-1", patch(4, "<I", 1), "unsupported gguf version 1"),
    ("version-4", patch(4, "<I", 4), "unsupported gguf version 4"),
    ("version-max", patch(4, "<I", 2**32 - 1), "unsupported gguf version 4294967295"),
    ("tensors-huge", patch(8, "<Q", 2**40), "tensor info 21 of the 1099511627776 the header announces"),
    ("tensors-max", patch(8, "<Q", 2**64 - 1), "tensor info 21 of the 18446744073709551615 the header announces"),
    ("tensors-more", _tensor_count(1000), "tensor info 21 of the 1000 the header announces"),
    ("kv-huge", patch(16, "<Q", 2**40), "key/value 28 of the 1099511627776 the header announces"),
    ("kv-max", patch(16, "<Q", 2**64 - 1), "key/value 28 of the 18446744073709551615 the header announces"),
    ("kv-more", _kv_count(10_000), "key/value 28 of the 10000 the header announces"),
    ("kv-fewer", _kv_count(3),
     ("unsupported tensor type 4 for 'llama.block_count'",
      "tensor info 1 of the 20 the header announces (after 3 key/values)")),
    ("key-length-huge", patch(24, "<Q", 2**62), "reading 4611686018427387904 bytes at byte 32"),
    ("key-length-max", patch(24, "<Q", 2**64 - 1), "reading 18446744073709551615 bytes at byte 32"),
    ("value-type-99", kv_patch("general.architecture", 0, "<I", 99), "unknown value type 99 at byte 52"),
    ("value-type-max", kv_patch("general.architecture", 0, "<I", 2**32 - 1),
     "unknown value type 4294967295 at byte 52"),
    ("string-length-huge", kv_patch("general.architecture", 4, "<Q", 2**60),
     "reading 1152921504606846976 bytes at byte 64"),
    ("array-count-huge", kv_patch("tokenizer.ggml.tokens", 8, "<Q", 2**62), "reading 21474836489 bytes at byte 763237"),
    ("array-subtype-99", kv_patch("tokenizer.ggml.tokens", 4, "<I", 99), "unknown value type 99 at byte 798"),
    ("array-nested", kv_patch("tokenizer.ggml.tokens", 4, "<I", GGUFValueType.ARRAY), "nested array at byte 798"),
    ("duplicate-key", raw_edit(_duplicate_key), "the key 'general.architecture' twice"),
    ("duplicate-tensor", raw_edit(_duplicate_tensor), "the tensor 'token_embd.weight' twice"),
    ("n-dims-0", info_patch(0, "n_dims", "<I", 0), "'token_embd.weight' has 0 dimensions (1 to 4)"),
    ("n-dims-5", info_patch(0, "n_dims", "<I", 5), "'token_embd.weight' has 5 dimensions (1 to 4)"),
    ("n-dims-max", info_patch(0, "n_dims", "<I", 2**32 - 1), "'token_embd.weight' has 4294967295 dimensions (1 to 4)"),
    ("dims-overflow", raw_edit(_huge_dims), "shape [4294967296, 4294967296], whose element count overflows 64 bits"),
    ("row-not-blocks", raw_edit(_bad_row), "rows of 33 elements, not a multiple of q4_0's block of 32"),
    ("tensor-type-99", info_patch(1, "type", "<I", 99), "unsupported tensor type 99 for 'blk.0.attn_norm.weight'"),
    ("tensor-type-max", info_patch(1, "type", "<I", 2**32 - 1),
     "unsupported tensor type 4294967295 for 'blk.0.attn_norm.weight'"),
    ("offset-misaligned", info_patch(2, "offset", "<Q", 1), "starts at offset 1, not a multiple of the alignment 32"),
    ("offset-past-end", info_patch(2, "offset", "<Q", 2**40), "has 3582560 bytes, its tensors need 1099513400416"),
    ("offset-max", info_patch(2, "offset", "<Q", 2**64 - 32),
     "has 3582560 bytes, its tensors need 18446744073711324224"),
    ("alignment-0", with_metadata({"general.alignment": u32(0)}),
     "general.alignment 0 is not a power of two from 1 to 65536"),
    ("alignment-3", with_metadata({"general.alignment": u32(3)}),
     "general.alignment 3 is not a power of two from 1 to 65536"),
    ("alignment-huge", with_metadata({"general.alignment": u32(2**31)}),
     "general.alignment 2147483648 is not a power of two from 1 to 65536"),
    ("alignment-string", with_metadata({"general.alignment": string("32")}),
     "general.alignment is string, llama.cpp requires uint32"),
    ("alignment-nan", with_metadata({"general.alignment": f32(float("nan"))}),
     "general.alignment is float32, llama.cpp requires uint32"),
    ("alignment-int64", with_metadata({"general.alignment": Value(GGUFValueType.UINT64, 32)}),
     "general.alignment is uint64, llama.cpp requires uint32"),
    ("architecture-missing", with_metadata({}, drop=("general.architecture",)), "has no general.architecture"),
    ("architecture-int", with_metadata({"general.architecture": u32(7)}),
     "general.architecture is uint32 7, expected a string"),
    ("architecture-unknown", with_metadata({"general.architecture": string("nkat-unknown-arch")}),
     "unknown model architecture: 'nkat-unknown-arch'"),
]
TRUNCATION = [(f"at-{n}", truncated_at(n), f"({n} bytes, less than the 24 of a gguf header)") for n in (4, 8, 16, 23)]
TRUNCATION += [(f"at-{n}", truncated_at(n), f"ends at byte {n}, inside key/value") for n in (24, 31, 40, 100, 1000,
                                                                                          10_000, 100_000)]
TRUNCATION += [("at-30pct", truncated(0.3), "ends at byte 1074768, inside key/value 21 of the 26")]
TRUNCATION += [(f"at-{int(f * 100)}pct", truncated(f), "bytes, its tensors need 3582560")
               for f in (0.5, 0.7, 0.9, 0.99)]
TRUNCATION += [("nkat-at-50pct", truncated(0.5, "nkat"), "has 2584416 bytes, its tensors need 5168832"),
               ("f32-at-80pct", truncated(0.8, "tiny"), "has 11719552 bytes, its tensors need 14649440")]


HPARAMS = [
    ("block-count-0", with_metadata({"llama.block_count": u32(0)}), "llama.block_count is 0; llama.cpp needs 1 to 512"),
    ("block-count-max", with_metadata({"llama.block_count": u32(2**32 - 1)}),
     "llama.block_count is 4294967295; llama.cpp needs 1 to 512"),
    ("block-count-513", with_metadata({"llama.block_count": u32(513)}),
     "llama.block_count is 513; llama.cpp needs 1 to 512"),
    ("block-count-3", with_metadata({"llama.block_count": u32(3)}), "tensor 'blk.2.attn_norm.weight' not found"),
    ("block-count-string", with_metadata({"llama.block_count": string("2")}),
     "llama.block_count is string, expected uint32"),
    ("block-count-float", with_metadata({"llama.block_count": f32(2.0)}),
     "llama.block_count is float32, expected uint32"),
    ("block-count-missing", with_metadata({}, drop=("llama.block_count",)),
     "metadata key llama.block_count is missing"),
    ("context-0", with_metadata({"llama.context_length": u32(0)}),
     "llama.context_length is 0; llama.cpp needs 1 to 16777216"),
    ("context-string", with_metadata({"llama.context_length": string("2048")}),
     "llama.context_length is string, expected uint32"),
    ("context-missing", with_metadata({}, drop=("llama.context_length",)),
     "metadata key llama.context_length is missing"),
    ("embedding-0", with_metadata({"llama.embedding_length": u32(0)}),
     "llama.embedding_length is 0; llama.cpp needs 1 to 1048576"),
    ("embedding-63", with_metadata({"llama.embedding_length": u32(63)}),
     "llama.embedding_length 63 is not a multiple of llama.attention.head_count 4"),
    ("embedding-huge", with_metadata({"llama.embedding_length": u32(2**32 - 1)}),
     "llama.embedding_length is 4294967295; llama.cpp needs 1 to 1048576"),
    ("heads-3", with_metadata({"llama.attention.head_count": u32(3)}),
     "llama.embedding_length 64 is not a multiple of llama.attention.head_count 3"),
    ("heads-huge", with_metadata({"llama.attention.head_count": u32(2**31)}),
     "llama.attention.head_count is 2147483648; llama.cpp needs 0 to 1048576"),
    ("heads-kv-0", with_metadata({"llama.attention.head_count_kv": u32(0)}),
     "llama.attention.head_count 4 is not a multiple of llama.attention.head_count_kv 0"),
    ("heads-kv-3", with_metadata({"llama.attention.head_count_kv": u32(3)}),
     "llama.attention.head_count 4 is not a multiple of llama.attention.head_count_kv 3"),
    ("heads-kv-array-short", with_metadata({"llama.attention.head_count_kv": array([2], GGUFValueType.UINT32)}),
     "llama.attention.head_count_kv must be uint32 or an array of 2 integers"),
    ("heads-kv-string", with_metadata({"llama.attention.head_count_kv": string("2")}),
     "llama.attention.head_count_kv is string, expected uint32"),
    ("ff-array-long", with_metadata({"llama.feed_forward_length": array([128] * 5, GGUFValueType.UINT32)}),
     "llama.feed_forward_length must be uint32 or an array of 2 integers"),
    ("rope-dims-3", with_metadata({"llama.rope.dimension_count": u32(3)}), "llama.rope.dimension_count 3 must be even"),
    ("rope-dims-1000", with_metadata({"llama.rope.dimension_count": u32(1000)}), "invalid n_rot: 1000, expected 16"),
    ("rope-base-nan", with_metadata({"llama.rope.freq_base": f32(float("nan"))}),
     "llama.rope.freq_base is nan; it must be a finite number > 0"),
    ("rope-base-negative", with_metadata({"llama.rope.freq_base": f32(-1.0)}),
     "llama.rope.freq_base is -1.0; it must be a finite number > 0"),
    ("rope-base-string", with_metadata({"llama.rope.freq_base": string("1e4")}),
     "llama.rope.freq_base is string, expected float32"),
    ("rope-scaling-bogus", with_metadata({"llama.rope.scaling.type": string("bogus")}),
     "llama.rope.scaling.type 'bogus' is not one of none, linear, yarn, longrope"),
    ("norm-eps-nan", with_metadata({"llama.attention.layer_norm_rms_epsilon": f32(float("nan"))}),
     "llama.attention.layer_norm_rms_epsilon is nan; it must be a finite number > 0"),
    ("experts-2000", with_metadata({"llama.expert_count": u32(2000)}),
     "llama.expert_count is 2000; llama.cpp needs 0 to 1024"),
    ("experts-used-without", with_metadata({"llama.expert_used_count": u32(2)}),
     "llama.expert_used_count is 2; llama.cpp needs 0 to 0"),
    ("expert-groups-without", with_metadata({"llama.expert_group_count": u32(2)}),
     "llama.expert_group_count 2 without experts"),
    ("vocab-size-mismatch", with_metadata({"llama.vocab_size": u32(100)}),
     "llama.vocab_size 100 differs from the tokenizer's 49152 tokens"),
    ("tokens-int-array", with_metadata({"tokenizer.ggml.tokens": array([1, 2, 3], GGUFValueType.INT32)}),
     "tokenizer.ggml.tokens must be a non-empty array of strings"),
    ("tokens-string", with_metadata({"tokenizer.ggml.tokens": string("abc")}),
     "tokenizer.ggml.tokens is string, expected array"),
    ("scores-short", with_metadata({"tokenizer.ggml.scores": array([0.0, 1.0], GGUFValueType.FLOAT32)}),
     "tokenizer.ggml.scores must be an array of 49152 values, one per token"),
]


def _names() -> list[str]:
    """The weights tiny_nkat carries theta for (convert's default selection: every 2-D weight but the
    tied embedding of the tiny model)."""
    return [f"blk.{i}.{w}.weight" for i in range(2) for w in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                               "ffn_gate", "ffn_up", "ffn_down")]


def _as_float_array(arr: np.ndarray) -> object:
    return array(np.full(arr.shape, 300.0, dtype=np.float32), GGUFValueType.FLOAT32)


THETA = [
    ("a-scale-nan", scale_set("a_scale", float("nan")),
     "nkat.theta.blk.0.attn_q.weight.a_scale[0] is nan; a theta scale must be finite and in [0, 16]"),
    ("a-scale-inf", scale_set("a_scale", float("inf")),
     "nkat.theta.blk.0.attn_q.weight.a_scale[0] is inf; a theta scale must be finite and in [0, 16]"),
    ("b-scale-nan", scale_set("b_scale", float("nan")),
     "nkat.theta.blk.0.attn_q.weight.b_scale[0] is nan; a theta scale must be finite and in [0, 16]"),
    ("b-scale-neg-inf", scale_set("b_scale", float("-inf")),
     "nkat.theta.blk.0.attn_q.weight.b_scale[0] is -inf; a theta scale must be finite and in [0, 16]"),
    ("a-scale-huge", scale_set("a_scale", 3e38),
     "nkat.theta.blk.0.attn_q.weight.a_scale[0] is 3.0000000054977558e+38; a theta scale must be finite"),
    ("b-scale-1e6", scale_set("b_scale", 1e6),
     "nkat.theta.blk.0.attn_q.weight.b_scale[0] is 1000000.0; a theta scale must be finite and in [0, 16]"),
    ("a-scale-negative", scale_set("a_scale", -0.5),
     "nkat.theta.blk.0.attn_q.weight.a_scale[0] is -0.5; a theta scale must be finite and in [0, 16]"),
    ("a-float-300", theta_part("a", _as_float_array),
     "nkat.theta.blk.0.attn_q.weight.a must be an array of int8, got an array of float32"),
    ("b-float", theta_part("b", lambda a: array(a.astype(np.float32), GGUFValueType.FLOAT32)),
     "nkat.theta.blk.0.attn_q.weight.b must be an array of int8, got an array of float32"),
    ("a-int16", theta_part("a", lambda a: array(a.astype(np.int16), GGUFValueType.INT16)),
     "nkat.theta.blk.0.attn_q.weight.a must be an array of int8, got an array of int16"),
    ("a-uint8", theta_part("a", lambda a: array(a.astype(np.uint8), GGUFValueType.UINT8)),
     "nkat.theta.blk.0.attn_q.weight.a must be an array of int8, got an array of uint8"),
    ("a-scale-float64", theta_part("a_scale", lambda a: array(a.astype(np.float64), GGUFValueType.FLOAT64)),
     "nkat.theta.blk.0.attn_q.weight.a_scale must be an array of float32, got an array of float64"),
    ("a-scale-int8", theta_part("a_scale", lambda a: array(np.ones(a.shape, np.int8), GGUFValueType.INT8)),
     "nkat.theta.blk.0.attn_q.weight.a_scale must be an array of float32, got an array of int8"),
    ("a-scalar", theta_part("a", lambda a: Value(GGUFValueType.INT32, 1)),
     "nkat.theta.blk.0.attn_q.weight.a must be an array of int8, got a single int32"),
    ("a-short", theta_part("a", lambda a: array(a[:-1], GGUFValueType.INT8)),
     "nkat.theta.blk.0.attn_q.weight.a has 255 elements, expected rank × in = 4 × 64 = 256"),
    ("b-long", theta_part("b", lambda a: array(np.concatenate([a, a]), GGUFValueType.INT8)),
     "nkat.theta.blk.0.attn_q.weight.b has 512 elements, expected rank × out = 4 × 64 = 256"),
    ("a-scale-empty", theta_part("a_scale", lambda a: array(np.zeros(0, np.float32), GGUFValueType.FLOAT32)),
     ("nkat.theta.blk.0.attn_q.weight.a_scale has 0 elements", "nkat.theta.ranks gives blk.0.attn_q.weight rank 4")),
    ("part-missing", with_metadata({}, "nkat", drop=(theta_key("b"),)),
     "nkat.theta.blk.0.attn_q.weight.b_scale is missing (blk.0.attn_q.weight is listed in nkat.theta.tensors)"),
    ("rank-string", with_metadata({nkat.THETA_RANK: string("4")}, "nkat"),
     "nkat.theta.rank must be a whole number from 0 to 4096, got string '4'"),
    ("rank-float", with_metadata({nkat.THETA_RANK: f32(4.0)}, "nkat"),
     "nkat.theta.rank must be a whole number from 0 to 4096, got float32 4.0"),
    ("rank-huge", with_metadata({nkat.THETA_RANK: u32(2**31)}, "nkat"),
     "nkat.theta.rank must be a whole number from 0 to 4096, got uint32 2147483648"),
    ("ranks-missing", with_metadata({}, "nkat", drop=(nkat.THETA_RANKS,)),
     "nkat.theta.ranks missing: nkat version 2 requires"),
    ("ranks-float", with_metadata({nkat.THETA_RANKS: array(np.full(len(_names()), 4.0, np.float32),
                                                         GGUFValueType.FLOAT32)}, "nkat"),
     "nkat.theta.ranks must be an array of whole numbers, got an array of float32"),
    ("ranks-short", with_metadata({nkat.THETA_RANKS: array([4], GGUFValueType.UINT32)}, "nkat"),
     ("nkat.theta.ranks has 1 elements", "nkat.theta.tensors lists 14 weights")),
    ("ranks-zero", with_metadata({nkat.THETA_RANKS: array(np.zeros(len(_names()), np.uint32),
                                                        GGUFValueType.UINT32)}, "nkat"),
     "nkat.theta.ranks[0] = 0 for blk.0.attn_k.weight, below 1"),
    ("ranks-huge", with_metadata({nkat.THETA_RANKS: array(np.full(len(_names()), 2**31, np.uint32),
                                                        GGUFValueType.UINT32)}, "nkat"),
     "nkat.theta.ranks holds ranks outside 0 to 4096"),
    ("ranks-5", with_metadata({nkat.THETA_RANKS: array(np.full(len(_names()), 5, np.uint32),
                                                     GGUFValueType.UINT32)}, "nkat"),
     ("nkat.theta.rank = 4", "the largest of nkat.theta.ranks is 5")),
    ("gamma-string", with_metadata({nkat.THETA_GAMMA: string("0.97")}, "nkat"),
     "nkat.theta.gamma must be float32, got string '0.97'"),
    ("gamma-nan", with_metadata({nkat.THETA_GAMMA: f32(float("nan"))}, "nkat"),
     "nkat.theta.gamma: gamma must be a number, got nan"),
    ("gamma-100", with_metadata({nkat.THETA_GAMMA: f32(100.0)}, "nkat"),
     "nkat.theta.gamma: gamma 100 is out of range [0, 16]"),
    ("gamma-int", with_metadata({nkat.THETA_GAMMA: u32(1)}, "nkat"), "nkat.theta.gamma must be float32, got uint32 1"),
    ("tensors-string", with_metadata({nkat.THETA_TENSORS: string(Q)}, "nkat"),
     "nkat.theta.tensors must be an array of tensor names (strings), got a single string"),
    ("tensors-ints", with_metadata({nkat.THETA_TENSORS: array([1, 2], GGUFValueType.INT32)}, "nkat"),
     "nkat.theta.tensors must be an array of tensor names (strings), got an array of int32"),
    ("tensors-unknown", with_metadata({nkat.THETA_TENSORS: array(["blk.9.nothing.weight"], GGUFValueType.STRING),
                                       nkat.THETA_RANKS: array([4], GGUFValueType.UINT32)}, "nkat"),
     "nkat.theta.tensors lists blk.9.nothing.weight, which is not a 2-d tensor"),
    ("tensors-norm", with_metadata({nkat.THETA_TENSORS: array(["blk.0.attn_norm.weight"], GGUFValueType.STRING),
                                    nkat.THETA_RANKS: array([4], GGUFValueType.UINT32)}, "nkat"),
     "nkat.theta.tensors lists blk.0.attn_norm.weight, which is not a 2-d tensor"),
    ("version-3", with_metadata({nkat.VERSION: u32(3)}, "nkat"),
     "nkat.version = 3: this nkat format version is not supported"),
    ("version-string", with_metadata({nkat.VERSION: string("1")}, "nkat"),
     "nkat.version must be a whole number, got string '1'"),
]


def _ranks(values: list[int]) -> Value:
    return array(np.asarray(values, np.uint32), GGUFValueType.UINT32)


N = len(_names())
# Files that state one fact twice, differently (docs/NKAT_FORMAT.md, "Consistency"): each is run through
# perplexity and export adapter, both of which must refuse it before writing anything.
CONTRADICTIONS = [
    ("rank-0-with-tensors", with_metadata({nkat.THETA_RANK: u32(0)}, "nkat"),
     ("nkat.theta.rank = 0", "nkat.theta.tensors lists 14 weights")),
    ("rank-8-ranks-4", with_metadata({nkat.THETA_RANK: u32(8)}, "nkat"),
     ("nkat.theta.rank = 8", "largest of nkat.theta.ranks is 4")),
    ("ranks-8-factors-4", with_metadata({nkat.THETA_RANK: u32(8), nkat.THETA_RANKS: _ranks([8] * N)}, "nkat"),
     ("a_scale has 4 elements (rank 4)", "nkat.theta.ranks gives blk.0.attn_k.weight rank 8")),
    ("v1-rank-8-factors-4", with_metadata({nkat.VERSION: u32(1), nkat.THETA_RANK: u32(8)}, "nkat",
                                          drop=(nkat.THETA_RANKS,)),
     ("a_scale has 4 elements (rank 4)", "nkat.theta.rank gives blk.0.attn_k.weight rank 8")),
    ("v1-rank-missing", with_metadata({nkat.VERSION: u32(1)}, "nkat", drop=(nkat.THETA_RANK,)),
     ("nkat.theta.rank missing", "nkat version 1 requires")),
    ("v2-rank-missing", with_metadata({nkat.THETA_RANKS: _ranks([4] * N)}, "nkat", drop=(nkat.THETA_RANK,)),
     ("nkat.theta.rank missing", "nkat version 2 requires")),
    ("v1-with-ranks", with_metadata({nkat.VERSION: u32(1)}, "nkat"),
     ("nkat.theta.ranks is a version 2 key", "nkat.version = 1")),
    ("gamma-missing", with_metadata({}, "nkat", drop=(nkat.THETA_GAMMA,)), ("nkat.theta.gamma missing",)),
    ("tensors-missing", with_metadata({}, "nkat", drop=(nkat.THETA_TENSORS,)), ("nkat.theta.tensors missing",)),
    ("rank-4-no-tensors", with_metadata({nkat.THETA_TENSORS: array([], GGUFValueType.STRING),
                                         nkat.THETA_RANKS: _ranks([])}, "nkat", drop=("nkat.theta.blk.",)),
     ("nkat.theta.rank = 4", "nkat.theta.tensors lists no weight")),
    ("tensors-fewer-than-factors", with_metadata({nkat.THETA_TENSORS: array([Q], GGUFValueType.STRING),
                                                  nkat.THETA_RANKS: _ranks([4])}, "nkat"),
     ("holds factors for blk.0.attn_k.weight", "nkat.theta.tensors does not list", "(1 listed)")),
    ("tensors-twice", with_metadata({nkat.THETA_TENSORS: array(_names() + [Q], GGUFValueType.STRING),
                                     nkat.THETA_RANKS: _ranks([4] * (N + 1))}, "nkat"),
     ("nkat.theta.tensors lists blk.0.attn_q.weight twice",)),
    ("ranks-longer-than-tensors", with_metadata({nkat.THETA_RANKS: _ranks([4] * (N + 1))}, "nkat"),
     ("nkat.theta.ranks has 15 elements", "nkat.theta.tensors lists 14 weights")),
    ("ranks-shorter-than-tensors", with_metadata({nkat.THETA_RANKS: _ranks([4] * (N - 1))}, "nkat"),
     ("nkat.theta.ranks has 13 elements", "nkat.theta.tensors lists 14 weights")),
    ("unknown-theta-key", with_metadata({"nkat.theta.method": string("svd")}, "nkat"),
     ("nkat.theta.method is not a key of the nkat format",)),
    ("unknown-weight-key", with_metadata({theta_key("rank"): u32(4)}, "nkat"),
     ("nkat.theta.blk.0.attn_q.weight.rank is not a key of the nkat format",)),
    ("b-scale-int32", theta_part("b_scale", lambda a: array(np.ones(a.shape, np.int32), GGUFValueType.INT32)),
     ("nkat.theta.blk.0.attn_q.weight.b_scale must be an array of float32", "got an array of int32")),
    ("b-scalar", theta_part("b", lambda a: Value(GGUFValueType.INT8, 1)),
     ("nkat.theta.blk.0.attn_q.weight.b must be an array of int8", "got a single int8")),
]


def _sums(width: int, value: float = 1.0) -> np.ndarray:
    return np.full((1, width), value, dtype=np.float32)


def _counts(value: float = 4.0) -> np.ndarray:
    return np.full((1, 1), value, dtype=np.float32)


IMATRIX = [
    ("width-0", imatrix_gguf({Q + ".in_sum2": np.zeros((1, 0), np.float32), Q + ".counts": _counts()}),
     "blk.0.attn_q.weight.in_sum2 has the shape [0, 1], with no values"),
    ("wrong-width", imatrix_gguf({Q + ".in_sum2": _sums(10), Q + ".counts": _counts()}),
     "blk.0.attn_q.weight has 10 values but the weight's input width is 64"),
    ("nan", imatrix_gguf({Q + ".in_sum2": _sums(64, float("nan")), Q + ".counts": _counts()}),
     "blk.0.attn_q.weight has an invalid value nan at index 0"),
    ("negative-count", imatrix_gguf({Q + ".in_sum2": _sums(64), Q + ".counts": _counts(-1.0)}),
     "blk.0.attn_q.weight.counts has an invalid value -1.0 at index 0"),
    ("no-counts", imatrix_gguf({Q + ".in_sum2": _sums(64)}),
     "blk.0.attn_q.weight.in_sum2 has no matching blk.0.attn_q.weight.counts"),
    ("orphan-counts", imatrix_gguf({Q + ".counts": _counts()}),
     "blk.0.attn_q.weight.counts has no matching .in_sum2 tensor"),
    ("counts-mismatch", imatrix_gguf({Q + ".in_sum2": _sums(64), Q + ".counts": np.ones((1, 3), np.float32)}),
     "blk.0.attn_q.weight has 1 matrices but 3 counts"),
    ("other-model", imatrix_gguf({"blk.7.attn_q.weight.in_sum2": _sums(64),
                                  "blk.7.attn_q.weight.counts": _counts()}),
     ("1 entries that are not weights of this model", "blk.7.attn_q.weight")),
    ("general-type", imatrix_gguf({Q + ".in_sum2": _sums(64), Q + ".counts": _counts()}, "model"),
     "general.type 'model', expected 'imatrix'"),
    ("no-entries", imatrix_gguf({"x.weight": np.ones((2, 2), np.float32)}), "has no .in_sum2 tensors"),
    ("legacy-zero-entries", legacy_imatrix([], 0), "legacy .dat layout (entry count 0 for 4 bytes)"),
    ("legacy-truncated", cut_end(legacy_imatrix([(Q, 1, np.ones(64))]), 10),
     "blk.0.attn_q.weight values at byte 35 runs past the end of the file"),
    ("legacy-nval-0", legacy_imatrix([(Q, 1, np.ones(0))]), "blk.0.attn_q.weight has ncall 1 and 0 values"),
    ("legacy-ncall-negative", legacy_imatrix([(Q, -3, np.ones(64))]), "blk.0.attn_q.weight has ncall -3 and 64 values"),
    ("legacy-wrong-width", legacy_imatrix([(Q, 1, np.ones(10))]),
     "blk.0.attn_q.weight has 10 values but the weight's input width is 64"),
    ("legacy-inf", legacy_imatrix([(Q, 1, np.full(64, np.inf))]),
     "blk.0.attn_q.weight has an invalid value inf at index 0"),
    ("legacy-count-huge", legacy_imatrix([(Q, 1, np.ones(64))], 2**30), "entry count 1073741824 for 291 bytes"),
    ("text", bytes_file(b"not an imatrix at all, just some words\n" * 10), "entry count 544501614 for 390 bytes"),
]
GATE = Q + ".so8t_generator"
SO8T = [
    ("not-safetensors", bytes_file(b"plain text\n" * 20),
     "not a readable safetensors file (error while deserializing header"),
    ("pickle", bytes_file(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."),
     "not a readable safetensors file (error while deserializing header"),
    ("unknown-tensor", safetensors_file({"blk.9.attn_q.weight.so8t_generator": np.zeros((8, 8, 8))}),
     "gate for blk.9.attn_q.weight, a tensor the model lacks"),
    ("bad-kind", safetensors_file({Q + ".something": np.zeros((8, 8, 8))}),
     "tensor blk.0.attn_q.weight.something is not <weight name>.so8t_generator"),
    ("wrong-shape", safetensors_file({GATE: np.zeros((3, 8, 8))}),
     "blk.0.attn_q.weight.so8t_generator has shape (3, 8, 8), expected (8, 8, 8)"),
    ("embedding", safetensors_file({"token_embd.weight.so8t_generator": np.zeros((8, 8, 8))}),
     "token_embd.weight cannot be gated: it is a lookup table"),
    ("norm", safetensors_file({"blk.0.attn_norm.weight.so8t_generator": np.zeros((8, 8, 8))}),
     "blk.0.attn_norm.weight has shape (64,): only weight matrices"),
    ("alpha-nan", safetensors_file({GATE: np.zeros((8, 8, 8)), Q + ".so8t_alpha": np.array(np.nan)}),
     "blk.0.attn_q.weight.so8t_alpha is nan, expected a finite number"),
    ("both-kinds", safetensors_file({GATE: np.zeros((8, 8, 8)), Q + ".so8t_rotation": np.zeros((8, 8, 8))}),
     "blk.0.attn_q.weight needs exactly one of .so8t_generator and .so8t_rotation"),
]

TEXT = bytes_file(b"plain text, not a model\n" * 40)
BLOCK0 = with_metadata({"llama.block_count": u32(0)})
NOT_UTF8 = bytes_file(b"caf\xe9 " * 100)
OPTIONS = [
    # convert
    ("convert-rank-negative", CONVERT + ("--theta-rank", "-1"), "--theta-rank must be >= 0, got -1", None),
    ("convert-rank-huge", CONVERT + ("--theta-rank", "1000"),
     "--theta-rank 1000 is larger than blk.0.attn_q.weight's smaller dimension 64", None),
    ("convert-gamma-nan", CONVERT + ("--theta-gamma", "nan"),
     "'--theta-gamma': gamma must be a number, got nan", None),
    ("convert-gamma-negative", CONVERT + ("--theta-gamma", "-1"),
     "'--theta-gamma': gamma -1 is out of range [0, 16]", None),
    ("convert-gamma-word", CONVERT + ("--theta-gamma", "abc"), "'--theta-gamma': 'abc' is not a number", None),
    ("convert-gamma-100", CONVERT + ("--theta-gamma", "100"), "gamma 100 is out of range [0, 16]", None),
    ("convert-outtype", CONVERT + ("--outtype", "Q9_9"), "unknown --outtype 'q9_9'", None),
    ("convert-selective", CONVERT + ("--selective-layers", "blk.99.nothing"),
     "--selective-layers 'blk.99.nothing' matches no attention/ffn weight", None),
    ("convert-output-dir", ("convert", "--input", "{tiny}", "--output", "{out}"),
     ("'--output'", "is a directory"), None),
    ("convert-output-proc", ("convert", "--input", "{tiny}", "--output", "/proc/nkat-corpus.gguf"),
     "output directory is not writable: /proc", None),
    ("convert-output-missing-dir", ("convert", "--input", "{tiny}", "--output", "/nonexistent-dir/x.gguf"),
     "output directory does not exist: /nonexistent-dir", None),
    ("convert-reference-missing", CONVERT + ("--reference", "{out}/missing.gguf"), "no such file: <path>", None),
    ("convert-reference-text", CONVERT + ("--reference", "{file}"), "magic b'plai', expected b'gguf'", TEXT),
    ("convert-calib-missing", CONVERT + ("--calib-text", "{out}/missing.txt"), "no such text file: <path>", None),
    ("convert-calib-not-utf8", CONVERT + ("--calib-text", "{file}"),
     "text file is not utf-8: <path> (invalid continuation byte at byte 3)", NOT_UTF8),
    ("convert-imatrix-missing", CONVERT + ("--imatrix", "{out}/missing.dat"), "no such imatrix file: <path>", None),
    ("convert-so8t-bogus", CONVERT + ("--so8t", "bogus"), "unknown so8t mode 'bogus'", None),
    ("convert-so8t-seed-alone", CONVERT + ("--so8t-seed", "3"),
     "--so8t-seed goes with --so8t hadamard, random or file:path; --so8t is none", None),
    ("convert-so8t-missing", CONVERT + ("--so8t", "file:{out}/missing.safetensors", "--imatrix", "none"),
     "no such so8t checkpoint: <path>", None),
    ("convert-so8t-imatrix-file", CONVERT + ("--so8t", "hadamard", "--imatrix", "{file}"),
     "--imatrix file describes the inputs of the unrotated model", TEXT),
    ("convert-same-file-type-string", CONVERT_FILE + ("--outtype", "same"),
     "key general.file_type has wrong type str but expected type u32",
     with_metadata({"general.file_type": string("Q4_0")}, "tiny")),
    ("convert-same-file-type-array", CONVERT_FILE + ("--outtype", "same"),
     "key general.file_type has wrong type arr but expected type u32",
     with_metadata({"general.file_type": array([2, 3], GGUFValueType.UINT32)}, "tiny")),
    ("convert-threads-word", CONVERT + ("--threads", "abc"), "'--threads': 'abc' is not a valid integer", None),
    ("convert-input-dir", ("convert", "--input", "{out}", "--output", "{out}/c.gguf"), "not a file: <path>", None),
    # perplexity
    ("perplexity-ctx-1", ("perplexity", "-m", "{tiny}", "--ctx", "1"), "--ctx must be at least 16, got 1", None),
    ("perplexity-ctx-0", ("perplexity", "-m", "{tiny}", "--ctx", "0"), "--ctx must be at least 16, got 0", None),
    ("perplexity-ctx-negative", ("perplexity", "-m", "{tiny}", "--ctx", "-5"),
     "--ctx must be at least 16, got -5", None),
    ("perplexity-ctx-billion", ("perplexity", "-m", "{tiny}", "--ctx", "1000000000"),
     ("--ctx 1000000000 exceeds", "trained context of 2048 tokens"), None),
    ("perplexity-ctx-4096", ("perplexity", "-m", "{tiny}", "--ctx", "4096"),
     ("--ctx 4096 exceeds", "trained context of 2048 tokens"), None),
    ("perplexity-chunks-0", ("perplexity", "-m", "{tiny}", "--chunks", "0"),
     "'--chunks': 0 is not in the range x>=1", None),
    ("perplexity-gamma-negative", ("perplexity", "-m", "{nkat}", "--gamma", "-1"),
     "'--gamma': gamma -1 is out of range [0, 16]", None),
    ("perplexity-gamma-nan", ("perplexity", "-m", "{nkat}", "--gamma", "nan"),
     "'--gamma': gamma must be a number, got nan", None),
    ("perplexity-gamma-100", PPL[:1] + ("-m", "{nkat}", "--ctx", "64", "--gamma", "100"),
     "gamma 100 is out of range [0, 16]", None),
    ("perplexity-gamma-no-theta", ("perplexity", "-m", "{plain}", "--gamma", "1"),
     "carries no theta; gamma has nothing to scale", None),
    ("perplexity-text-missing", ("perplexity", "-m", "{tiny}", "--text", "{out}/missing.txt"),
     "no such text file: <path>", None),
    ("perplexity-text-not-utf8", ("perplexity", "-m", "{tiny}", "--text", "{file}"),
     "text file is not utf-8: <path> (invalid continuation byte at byte 3)", NOT_UTF8),
    ("perplexity-text-short", ("perplexity", "-m", "{tiny}", "--ctx", "64", "--text", "{file}"),
     "text too short: 4 tokens, one chunk needs n_ctx=64",
     bytes_file(b"just a few words")),
    ("perplexity-model-missing", ("perplexity", "-m", "{out}/missing.gguf"), "no such file: <path>", None),
    ("perplexity-model-dir", ("perplexity", "-m", "{out}"), "not a file: <path>", None),
    # bench
    ("bench-prompt-0", ("bench", "-m", "{tiny}", "--n-prompt", "0"), "'--n-prompt': 0 is not in the range x>=1", None),
    ("bench-prompt-huge", ("bench", "-m", "{tiny}", "--n-prompt", "100000"),
     ("--n-prompt + --n-gen 100128 exceeds", "trained context of 2048 tokens"), None),
    ("bench-repetitions-0", ("bench", "-m", "{tiny}", "-r", "0"),
     "'--repetitions' / '-r': 0 is not in the range x>=1", None),
    ("bench-gamma-nan", ("bench", "-m", "{nkat}", "--gamma", "nan"),
     "'--gamma': gamma must be a number, got nan", None),
    # compare
    ("compare-no-theta", ("compare", "-m", "{plain}", "--ctx", "64", "-r", "1"),
     "carries no theta: nothing to compare", None),
    ("compare-reference-missing", ("compare", "-m", "{nkat}", "--reference", "{out}/missing.gguf"),
     "no such file: <path>", None),
    ("compare-reference-text", ("compare", "-m", "{nkat}", "--reference", "{file}"),
     "magic b'plai', expected b'gguf'", TEXT),
    ("compare-reference-hparams", ("compare", "-m", "{nkat}", "--reference", "{file}"),
     "llama.block_count is 0; llama.cpp needs 1 to 512", BLOCK0),
    ("compare-ctx-1", ("compare", "-m", "{nkat}", "--ctx", "1"), "--ctx must be at least 16, got 1", None),
    ("compare-ctx-billion", ("compare", "-m", "{nkat}", "--ctx", "1000000000"),
     ("--ctx 1000000000 exceeds", "trained context of 2048 tokens"), None),
    ("compare-chunks-0", ("compare", "-m", "{nkat}", "--chunks", "0"), "'--chunks': 0 is not in the range x>=1", None),
    ("compare-model-missing", ("compare", "-m", "{out}/missing.gguf"), "no such file: <path>", None),
    # quality
    ("quality-ctx-1", ("quality", "--input", "{tiny}", "--ctx", "1"), "--ctx must be at least 16, got 1", None),
    ("quality-ctx-billion", ("quality", "--input", "{tiny}", "--ctx", "1000000000"),
     ("--ctx 1000000000 exceeds", "trained context of 2048 tokens"), None),
    ("quality-reference-missing", ("quality", "--input", "{tiny}", "--reference", "{out}/missing.gguf"),
     "no such file: <path>", None),
    ("quality-outtype", ("quality", "--input", "{tiny}", "--outtype", "Q9_9"), "unknown --outtype 'q9_9'", None),
    ("quality-rank-0", ("quality", "--input", "{tiny}", "--theta-rank", "0"),
     "'--theta-rank': 0 is not in the range x>=1", None),
    ("quality-input-hparams", ("quality", "--input", "{file}"),
     "llama.block_count is 0; llama.cpp needs 1 to 512", BLOCK0),
    # optimize
    ("optimize-ranks-word", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--ranks", "a,b"),
     "--ranks must be comma-separated whole numbers, got 'a,b'", None),
    ("optimize-ranks-0", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--ranks", "0"),
     "--ranks must be >= 1, got 0", None),
    ("optimize-ranks-huge", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--ranks", "2,1000"),
     "--theta-rank 1000 is larger than blk.0.attn_q.weight's smaller dimension 64",
     None),
    ("optimize-gamma-inverted", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--gamma-range", "0.9,0.1"),
     "--gamma-range 0.9,0.1 is inverted", None),
    ("optimize-gamma-word", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--gamma-range", "a,b"),
     "--gamma-range must be two numbers low,high, got 'a,b'", None),
    ("optimize-mode", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--mode", "bogus"),
     "unknown --mode 'bogus'", None),
    ("optimize-trials-0", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--mode", "custom", "--trials", "0"),
     "--trials must be at least 1, got 0", None),
    ("optimize-ctx-1", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--ctx", "1"),
     "--ctx must be at least 16, got 1", None),
    ("optimize-ctx-billion", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--ctx", "1000000000"),
     ("--ctx 1000000000 exceeds", "trained context of 2048 tokens"), None),
    ("optimize-model-missing", ("optimize", "-m", "{out}/missing.gguf", "-o", "{out}/opt"),
     "no such file: <path>", None),
    ("optimize-model-text", ("optimize", "-m", "{file}", "-o", "{out}/opt"), "magic b'plai', expected b'gguf'", TEXT),
    ("optimize-model-hparams", ("optimize", "-m", "{file}", "-o", "{out}/opt"),
     "llama.block_count is 0; llama.cpp needs 1 to 512", BLOCK0),
    # exports
    ("adapter-output-dir", ("export", "adapter", "{nkat}", "-o", "{out}"),
     "-o <path> is a directory; give a file name", None),
    ("adapter-type", ("export", "adapter", "{nkat}", "-o", "{out}/a.gguf", "--type", "Q4_0"),
     "'--type': 'q4_0' is not one of 'f16', 'f32'", None),
    ("adapter-gamma-100", ("export", "adapter", "{nkat}", "-o", "{out}/a.gguf", "--gamma", "100"),
     "gamma 100 is out of range [0, 16]",
     None),
    ("adapter-model-missing", ("export", "adapter", "{out}/missing.gguf", "-o", "{out}/a.gguf"), "no such file: <path>",
     None),
    ("adapter-onto-input", ("export", "adapter", "{file}", "-o", "{file}"),
     "<path> is the input model; choose another output",
     with_metadata({}, "nkat")),
    ("ollama-name", ("export", "ollama", "{nkat}", "--output-dir", "{out}/o", "--name", "bad name!"),
     "--name 'bad name!' is not an ollama model name", None),
    ("ollama-outtype-alone", ("export", "ollama", "{nkat}", "--output-dir", "{out}/o", "--outtype", "Q8_0"),
     "--outtype applies to --merged only", None),
    ("ollama-merged-outtype", ("export", "ollama", "{nkat}", "--output-dir", "{out}/o", "--merged", "--outtype",
                               "Q9_9"), "unknown --outtype 'q9_9'", None),
    ("ollama-output-file", ("export", "ollama", "{nkat}", "--output-dir", "{file}"),
     ("'--output-dir'", "is a file"), TEXT),
    ("kobold-gamma-negative", ("export", "kobold", "{nkat}", "--output-dir", "{out}/k", "--gamma", "-1"),
     "'--gamma': gamma -1 is out of range [0, 16]",
     None),
    ("kobold-threads-0", ("export", "kobold", "{nkat}", "--output-dir", "{out}/k", "--threads", "0"),
     "'--threads': 0 is not in the range x>=1",
     None),
    # serve, qc, others
    ("serve-port", ("serve", "{tiny}", "--port", "99999"), "'--port': 99999 is not in the range 0<=x<=65535", None),
    ("serve-ctx-5", ("serve", "{tiny}", "--ctx", "5"), "'--ctx': 5 is not in the range x>=16", None),
    ("serve-ctx-billion", ("serve", "{tiny}", "--ctx", "1000000000"),
     ("n_ctx 1000000000 exceeds", "trained context of 2048 tokens"), None),
    ("serve-gamma-nan", ("serve", "{nkat}", "--gamma", "nan"), "'--gamma': gamma must be a number, got nan", None),
    ("serve-model-missing", ("serve", "{out}/missing.gguf"), "no such file: <path>", None),
    ("serve-model-hparams", ("serve", "{file}"), "llama.block_count is 0; llama.cpp needs 1 to 512", BLOCK0),
    ("qc-pre-text", ("qc", "bake", "--pre", "{file}", "--post", "{tiny}"), "magic b'plai', expected b'gguf'", TEXT),
    ("qc-pre-hparams", ("qc", "bake", "--pre", "{file}", "--post", "{tiny}"),
     "llama.block_count is 0; llama.cpp needs 1 to 512", BLOCK0),
    ("qc-post-missing", ("qc", "bake", "--pre", "{tiny}", "--post", "{out}/missing.gguf"),
     ("'--post'", "does not exist"), None),
    ("qc-text-missing", ("qc", "bake", "--pre", "{tiny}", "--post", "{tiny}", "--text", "{out}/missing.txt"),
     "no such text file: <path>", None),
    ("backends-model-missing", ("backends", "{out}/missing.gguf"), "no such file: <path>", None),
    ("unknown-command", ("frobnicate",), "no such command 'frobnicate'", None),
    ("unknown-option", ("perplexity", "--frobnicate"), "no such option '--frobnicate'", None),
]
CONTROLS = [
    Case("control-perplexity", PPL[:2] + ("{tiny}",) + PPL[3:], None),
    Case("control-perplexity-theta", PPL[:2] + ("{nkat}",) + PPL[3:], None),
    Case("control-adapter", ("export", "adapter", "{nkat}", "-o", "{out}/a.gguf"), None, creates=("a.gguf",)),
    Case("control-kobold", ("export", "kobold", "{nkat}", "--output-dir", "{out}/k"), None,
         creates=("k/tiny.theta.gguf", "k/tiny.kcpps")),
    Case("control-ollama", ("export", "ollama", "{nkat}", "--output-dir", "{out}/o"), None,
         creates=("o/tiny.gguf", "o/tiny.theta.gguf", "o/Modelfile")),
    Case("control-compare-small-ctx", ("compare", "-m", "{nkat}", "--ctx", "64", "--chunks", "1", "-r", "1",
                                       "--threads", "1"), None),
    Case("control-convert", CONVERT + ("--imatrix", "none", "--theta-calib", "none"), None, creates=("c.gguf",)),
    Case("control-imatrix-legacy", CONVERT + ("--imatrix", "{file}", "--theta-calib", "none"), None,
         legacy_imatrix([(Q, 2, np.ones(64))]), suffix=".dat", creates=("c.gguf",)),
]
SLOW = [  # each runs real work before it fails (a requantization, a calibration)
    Case("theta-merged-nan", ("export", "ollama", "{file}", "--output-dir", "{out}/o", "--merged"),
         "nkat.theta.blk.0.attn_q.weight.a_scale[0] is nan; a theta scale must be finite and in [0, 16]",
         scale_set("a_scale", float("nan")), slow=True),
    Case("theta-merged-float", ("export", "ollama", "{file}", "--output-dir", "{out}/o", "--merged"),
         "nkat.theta.blk.0.attn_q.weight.a must be an array of int8, got an array of float32",
         theta_part("a", _as_float_array), slow=True),
    Case("control-ollama-merged", ("export", "ollama", "{nkat}", "--output-dir", "{out}/o", "--merged",
                                   "--ppl-chunks", "1", "--threads", "1"), None,
         creates=("o/tiny.merged.gguf", "o/Modelfile"), slow=True),
    Case("control-convert-calibrated", CONVERT, None, creates=("c.gguf",), slow=True),
]


def all_cases() -> list[Case]:
    cases = spread("structure", STRUCTURE) + spread("truncated", TRUNCATION)
    cases += spread("hparams", HPARAMS)
    cases += spread("theta", THETA, THETA_READERS)
    cases += [Case(f"contradiction-{name}-{label}", args, expect, build)
              for name, build, expect in CONTRADICTIONS for label, args in (("ppl", PPL), ("adapter", ADAPTER))]
    cases += [Case(f"imatrix-{name}", CONVERT + ("--imatrix", "{file}"), expect, build, suffix=".imatrix")
              for name, build, expect in IMATRIX]
    cases += [Case(f"so8t-{name}", CONVERT + ("--so8t", "file:{file}", "--imatrix", "none"), expect, build,
                   suffix=".safetensors") for name, build, expect in SO8T]
    cases += [Case(name, args, expect, build) for name, args, expect, build in OPTIONS]
    return cases + CONTROLS + SLOW
