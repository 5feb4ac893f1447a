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
THETA_READERS = (
    PPL,
    ("export", "adapter", "{file}", "-o", "{out}/a.gguf"),
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
    ("empty", bytes_file(b""), "not a gguf"),
    ("text", bytes_file(b"plain text, not a model\n" * 40), "not a gguf"),
    ("magic", bytes_file(b"GGUX" + bytes(100)), "not a gguf"),
    ("magic-lower", bytes_file(b"gguf" + bytes(100)), "not a gguf"),
    ("version-0", patch(4, "<I", 0), "version 0"),
    ("version-1", patch(4, "<I", 1), "version 1"),
    ("version-4", patch(4, "<I", 4), "version 4"),
    ("version-max", patch(4, "<I", 2**32 - 1), "version"),
    ("tensors-huge", patch(8, "<Q", 2**40), "gguf"),
    ("tensors-max", patch(8, "<Q", 2**64 - 1), "gguf"),
    ("tensors-more", _tensor_count(1000), "gguf"),
    ("kv-huge", patch(16, "<Q", 2**40), "gguf"),
    ("kv-max", patch(16, "<Q", 2**64 - 1), "gguf"),
    ("kv-more", _kv_count(10_000), "gguf"),
    ("kv-fewer", _kv_count(3), "gguf"),
    ("key-length-huge", patch(24, "<Q", 2**62), "truncated"),
    ("key-length-max", patch(24, "<Q", 2**64 - 1), "truncated"),
    ("value-type-99", kv_patch("general.architecture", 0, "<I", 99), "value type 99"),
    ("value-type-max", kv_patch("general.architecture", 0, "<I", 2**32 - 1), "value type"),
    ("string-length-huge", kv_patch("general.architecture", 4, "<Q", 2**60), "truncated"),
    ("array-count-huge", kv_patch("tokenizer.ggml.tokens", 8, "<Q", 2**62), "truncated"),
    ("array-subtype-99", kv_patch("tokenizer.ggml.tokens", 4, "<I", 99), "value type 99"),
    ("array-nested", kv_patch("tokenizer.ggml.tokens", 4, "<I", GGUFValueType.ARRAY), "nested array"),
    ("duplicate-key", raw_edit(_duplicate_key), "twice"),
    ("duplicate-tensor", raw_edit(_duplicate_tensor), "twice"),
    ("n-dims-0", info_patch(0, "n_dims", "<I", 0), "dimensions"),
    ("n-dims-5", info_patch(0, "n_dims", "<I", 5), "dimensions"),
    ("n-dims-max", info_patch(0, "n_dims", "<I", 2**32 - 1), "dimensions"),
    ("dims-overflow", raw_edit(_huge_dims), "overflow"),
    ("row-not-blocks", raw_edit(_bad_row), "block"),
    ("tensor-type-99", info_patch(1, "type", "<I", 99), "tensor type 99"),
    ("tensor-type-max", info_patch(1, "type", "<I", 2**32 - 1), "tensor type"),
    ("offset-misaligned", info_patch(2, "offset", "<Q", 1), "alignment"),
    ("offset-past-end", info_patch(2, "offset", "<Q", 2**40), "truncated"),
    ("offset-max", info_patch(2, "offset", "<Q", 2**64 - 32), "truncated"),
    ("alignment-0", with_metadata({"general.alignment": u32(0)}), "alignment"),
    ("alignment-3", with_metadata({"general.alignment": u32(3)}), "alignment"),
    ("alignment-huge", with_metadata({"general.alignment": u32(2**31)}), "alignment"),
    ("alignment-string", with_metadata({"general.alignment": string("32")}), "alignment"),
    ("alignment-nan", with_metadata({"general.alignment": f32(float("nan"))}), "alignment"),
    ("alignment-int64", with_metadata({"general.alignment": Value(GGUFValueType.UINT64, 32)}), "alignment"),
    ("architecture-missing", with_metadata({}, drop=("general.architecture",)), "architecture"),
    ("architecture-int", with_metadata({"general.architecture": u32(7)}), "architecture"),
    ("architecture-unknown", with_metadata({"general.architecture": string("nkat-unknown-arch")}), "architecture"),
]
TRUNCATION = [(f"at-{n}", truncated_at(n), "gguf") for n in (4, 8, 16, 23, 24, 31, 40, 100, 1000, 10_000, 100_000)]
TRUNCATION += [(f"at-{int(f * 100)}pct", truncated(f), "truncated") for f in (0.3, 0.5, 0.7, 0.9, 0.99)]
TRUNCATION += [("nkat-at-50pct", truncated(0.5, "nkat"), "truncated"),
               ("f32-at-80pct", truncated(0.8, "tiny"), "truncated")]


HPARAMS = [
    ("block-count-0", with_metadata({"llama.block_count": u32(0)}), "block_count"),
    ("block-count-max", with_metadata({"llama.block_count": u32(2**32 - 1)}), "block_count"),
    ("block-count-513", with_metadata({"llama.block_count": u32(513)}), "block_count"),
    ("block-count-3", with_metadata({"llama.block_count": u32(3)}), "tensor"),
    ("block-count-string", with_metadata({"llama.block_count": string("2")}), "block_count"),
    ("block-count-float", with_metadata({"llama.block_count": f32(2.0)}), "block_count"),
    ("block-count-missing", with_metadata({}, drop=("llama.block_count",)), "block_count"),
    ("context-0", with_metadata({"llama.context_length": u32(0)}), "context_length"),
    ("context-string", with_metadata({"llama.context_length": string("2048")}), "context_length"),
    ("context-missing", with_metadata({}, drop=("llama.context_length",)), "context_length"),
    ("embedding-0", with_metadata({"llama.embedding_length": u32(0)}), "embedding_length"),
    ("embedding-63", with_metadata({"llama.embedding_length": u32(63)}), "embedding_length"),
    ("embedding-huge", with_metadata({"llama.embedding_length": u32(2**32 - 1)}), "embedding_length"),
    ("heads-3", with_metadata({"llama.attention.head_count": u32(3)}), "head_count"),
    ("heads-huge", with_metadata({"llama.attention.head_count": u32(2**31)}), "head_count"),
    ("heads-kv-0", with_metadata({"llama.attention.head_count_kv": u32(0)}), "head_count_kv"),
    ("heads-kv-3", with_metadata({"llama.attention.head_count_kv": u32(3)}), "head_count_kv"),
    ("heads-kv-array-short", with_metadata({"llama.attention.head_count_kv": array([2], GGUFValueType.UINT32)}),
     "head_count_kv"),
    ("heads-kv-string", with_metadata({"llama.attention.head_count_kv": string("2")}), "head_count_kv"),
    ("ff-array-long", with_metadata({"llama.feed_forward_length": array([128] * 5, GGUFValueType.UINT32)}),
     "feed_forward_length"),
    ("rope-dims-3", with_metadata({"llama.rope.dimension_count": u32(3)}), "dimension_count"),
    ("rope-dims-1000", with_metadata({"llama.rope.dimension_count": u32(1000)}), "n_rot"),
    ("rope-base-nan", with_metadata({"llama.rope.freq_base": f32(float("nan"))}), "freq_base"),
    ("rope-base-negative", with_metadata({"llama.rope.freq_base": f32(-1.0)}), "freq_base"),
    ("rope-base-string", with_metadata({"llama.rope.freq_base": string("1e4")}), "freq_base"),
    ("rope-scaling-bogus", with_metadata({"llama.rope.scaling.type": string("bogus")}), "scaling.type"),
    ("norm-eps-nan", with_metadata({"llama.attention.layer_norm_rms_epsilon": f32(float("nan"))}), "epsilon"),
    ("experts-2000", with_metadata({"llama.expert_count": u32(2000)}), "expert_count"),
    ("experts-used-without", with_metadata({"llama.expert_used_count": u32(2)}), "expert_used_count"),
    ("expert-groups-without", with_metadata({"llama.expert_group_count": u32(2)}), "expert_group_count"),
    ("vocab-size-mismatch", with_metadata({"llama.vocab_size": u32(100)}), "vocab_size"),
    ("tokens-int-array", with_metadata({"tokenizer.ggml.tokens": array([1, 2, 3], GGUFValueType.INT32)}),
     "tokenizer.ggml.tokens"),
    ("tokens-string", with_metadata({"tokenizer.ggml.tokens": string("abc")}), "tokenizer.ggml.tokens"),
    ("scores-short", with_metadata({"tokenizer.ggml.scores": array([0.0, 1.0], GGUFValueType.FLOAT32)}),
     "tokenizer.ggml.scores"),
]


def _names() -> list[str]:
    """The weights tiny_nkat carries theta for (convert's default selection: every 2-D weight but the
    tied embedding of the tiny model)."""
    return [f"blk.{i}.{w}.weight" for i in range(2) for w in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                               "ffn_gate", "ffn_up", "ffn_down")]


def _as_float_array(arr: np.ndarray) -> object:
    return array(np.full(arr.shape, 300.0, dtype=np.float32), GGUFValueType.FLOAT32)


THETA = [
    ("a-scale-nan", scale_set("a_scale", float("nan")), "a_scale"),
    ("a-scale-inf", scale_set("a_scale", float("inf")), "a_scale"),
    ("b-scale-nan", scale_set("b_scale", float("nan")), "b_scale"),
    ("b-scale-neg-inf", scale_set("b_scale", float("-inf")), "b_scale"),
    ("a-scale-huge", scale_set("a_scale", 3e38), "a_scale"),
    ("b-scale-1e6", scale_set("b_scale", 1e6), "b_scale"),
    ("a-scale-negative", scale_set("a_scale", -0.5), "a_scale"),
    ("a-float-300", theta_part("a", _as_float_array), "must be an array of int8"),
    ("b-float", theta_part("b", lambda a: array(a.astype(np.float32), GGUFValueType.FLOAT32)), "int8"),
    ("a-int16", theta_part("a", lambda a: array(a.astype(np.int16), GGUFValueType.INT16)), "int8"),
    ("a-uint8", theta_part("a", lambda a: array(a.astype(np.uint8), GGUFValueType.UINT8)), "int8"),
    ("a-scale-float64", theta_part("a_scale", lambda a: array(a.astype(np.float64), GGUFValueType.FLOAT64)),
     "float32"),
    ("a-scale-int8", theta_part("a_scale", lambda a: array(np.ones(a.shape, np.int8), GGUFValueType.INT8)),
     "float32"),
    ("a-scalar", theta_part("a", lambda a: Value(GGUFValueType.INT32, 1)), "int8"),
    ("a-short", theta_part("a", lambda a: array(a[:-1], GGUFValueType.INT8)), "elements"),
    ("b-long", theta_part("b", lambda a: array(np.concatenate([a, a]), GGUFValueType.INT8)), "elements"),
    ("a-scale-empty", theta_part("a_scale", lambda a: array(np.zeros(0, np.float32), GGUFValueType.FLOAT32)),
     "elements"),
    ("part-missing", with_metadata({}, "nkat", drop=(theta_key("b"),)), "missing"),
    ("rank-string", with_metadata({nkat.THETA_RANK: string("4")}, "nkat"), "rank"),
    ("rank-float", with_metadata({nkat.THETA_RANK: f32(4.0)}, "nkat"), "rank"),
    ("rank-huge", with_metadata({nkat.THETA_RANK: u32(2**31)}, "nkat"), "rank"),
    ("v1-rank-5", with_metadata({nkat.VERSION: u32(1), nkat.THETA_RANK: u32(5)}, "nkat"), "elements"),
    ("v1-rank-missing", with_metadata({nkat.VERSION: u32(1)}, "nkat", drop=(nkat.THETA_RANK,)), "incomplete"),
    ("ranks-missing", with_metadata({}, "nkat", drop=(nkat.THETA_RANKS,)), "missing"),
    ("ranks-float", with_metadata({nkat.THETA_RANKS: array(np.full(len(_names()), 4.0, np.float32),
                                                         GGUFValueType.FLOAT32)}, "nkat"), "whole numbers"),
    ("ranks-short", with_metadata({nkat.THETA_RANKS: array([4], GGUFValueType.UINT32)}, "nkat"), "one rank per name"),
    ("ranks-zero", with_metadata({nkat.THETA_RANKS: array(np.zeros(len(_names()), np.uint32),
                                                        GGUFValueType.UINT32)}, "nkat"), "below 1"),
    ("ranks-huge", with_metadata({nkat.THETA_RANKS: array(np.full(len(_names()), 2**31, np.uint32),
                                                        GGUFValueType.UINT32)}, "nkat"), "ranks outside"),
    ("ranks-5", with_metadata({nkat.THETA_RANKS: array(np.full(len(_names()), 5, np.uint32),
                                                     GGUFValueType.UINT32)}, "nkat"), "elements"),
    ("gamma-string", with_metadata({nkat.THETA_GAMMA: string("0.97")}, "nkat"), "gamma"),
    ("gamma-nan", with_metadata({nkat.THETA_GAMMA: f32(float("nan"))}, "nkat"), "gamma"),
    ("gamma-100", with_metadata({nkat.THETA_GAMMA: f32(100.0)}, "nkat"), "gamma"),
    ("gamma-int", with_metadata({nkat.THETA_GAMMA: u32(1)}, "nkat"), "gamma"),
    ("tensors-string", with_metadata({nkat.THETA_TENSORS: string(Q)}, "nkat"), "tensors"),
    ("tensors-ints", with_metadata({nkat.THETA_TENSORS: array([1, 2], GGUFValueType.INT32)}, "nkat"), "tensors"),
    ("tensors-unknown", with_metadata({nkat.THETA_TENSORS: array(["blk.9.nothing.weight"], GGUFValueType.STRING),
                                       nkat.THETA_RANKS: array([4], GGUFValueType.UINT32)}, "nkat"),
     "not a 2-d tensor"),
    ("tensors-norm", with_metadata({nkat.THETA_TENSORS: array(["blk.0.attn_norm.weight"], GGUFValueType.STRING),
                                    nkat.THETA_RANKS: array([4], GGUFValueType.UINT32)}, "nkat"),
     "not a 2-d tensor"),
    ("version-3", with_metadata({nkat.VERSION: u32(3)}, "nkat"), "version"),
    ("version-string", with_metadata({nkat.VERSION: string("1")}, "nkat"), "version"),
]


def _sums(width: int, value: float = 1.0) -> np.ndarray:
    return np.full((1, width), value, dtype=np.float32)


def _counts(value: float = 4.0) -> np.ndarray:
    return np.full((1, 1), value, dtype=np.float32)


IMATRIX = [
    ("width-0", imatrix_gguf({Q + ".in_sum2": np.zeros((1, 0), np.float32), Q + ".counts": _counts()}),
     "no values"),
    ("wrong-width", imatrix_gguf({Q + ".in_sum2": _sums(10), Q + ".counts": _counts()}), "input width"),
    ("nan", imatrix_gguf({Q + ".in_sum2": _sums(64, float("nan")), Q + ".counts": _counts()}), "invalid value"),
    ("negative-count", imatrix_gguf({Q + ".in_sum2": _sums(64), Q + ".counts": _counts(-1.0)}), "invalid value"),
    ("no-counts", imatrix_gguf({Q + ".in_sum2": _sums(64)}), "no matching"),
    ("orphan-counts", imatrix_gguf({Q + ".counts": _counts()}), "no matching"),
    ("counts-mismatch", imatrix_gguf({Q + ".in_sum2": _sums(64), Q + ".counts": np.ones((1, 3), np.float32)}),
     "counts"),
    ("other-model", imatrix_gguf({"blk.7.attn_q.weight.in_sum2": _sums(64),
                                  "blk.7.attn_q.weight.counts": _counts()}), "not weights of this model"),
    ("general-type", imatrix_gguf({Q + ".in_sum2": _sums(64), Q + ".counts": _counts()}, "model"), "general.type"),
    ("no-entries", imatrix_gguf({"x.weight": np.ones((2, 2), np.float32)}), "no .in_sum2"),
    ("legacy-zero-entries", legacy_imatrix([], 0), "legacy"),
    ("legacy-truncated", cut_end(legacy_imatrix([(Q, 1, np.ones(64))]), 10), "runs past the end"),
    ("legacy-nval-0", legacy_imatrix([(Q, 1, np.ones(0))]), "values"),
    ("legacy-ncall-negative", legacy_imatrix([(Q, -3, np.ones(64))]), "ncall"),
    ("legacy-wrong-width", legacy_imatrix([(Q, 1, np.ones(10))]), "input width"),
    ("legacy-inf", legacy_imatrix([(Q, 1, np.full(64, np.inf))]), "invalid value"),
    ("legacy-count-huge", legacy_imatrix([(Q, 1, np.ones(64))], 2**30), "entry count"),
    ("text", bytes_file(b"not an imatrix at all, just some words\n" * 10), "legacy"),
]
GATE = Q + ".so8t_generator"
SO8T = [
    ("not-safetensors", bytes_file(b"plain text\n" * 20), "not a readable safetensors"),
    ("pickle", bytes_file(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."), "not a readable safetensors"),
    ("unknown-tensor", safetensors_file({"blk.9.attn_q.weight.so8t_generator": np.zeros((8, 8, 8))}),
     "the model lacks"),
    ("bad-kind", safetensors_file({Q + ".something": np.zeros((8, 8, 8))}), "is not <weight name>"),
    ("wrong-shape", safetensors_file({GATE: np.zeros((3, 8, 8))}), "has shape"),
    ("embedding", safetensors_file({"token_embd.weight.so8t_generator": np.zeros((8, 8, 8))}), "lookup table"),
    ("norm", safetensors_file({"blk.0.attn_norm.weight.so8t_generator": np.zeros((8, 8, 8))}), "weight matrices"),
    ("alpha-nan", safetensors_file({GATE: np.zeros((8, 8, 8)), Q + ".so8t_alpha": np.array(np.nan)}), "finite"),
    ("both-kinds", safetensors_file({GATE: np.zeros((8, 8, 8)), Q + ".so8t_rotation": np.zeros((8, 8, 8))}),
     "exactly one"),
]

TEXT = bytes_file(b"plain text, not a model\n" * 40)
BLOCK0 = with_metadata({"llama.block_count": u32(0)})
NOT_UTF8 = bytes_file(b"caf\xe9 " * 100)
OPTIONS = [
    # convert
    ("convert-rank-negative", CONVERT + ("--theta-rank", "-1"), ">= 0", None),
    ("convert-rank-huge", CONVERT + ("--theta-rank", "1000"), "larger than", None),
    ("convert-gamma-nan", CONVERT + ("--theta-gamma", "nan"), "--theta-gamma", None),
    ("convert-gamma-negative", CONVERT + ("--theta-gamma", "-1"), "--theta-gamma", None),
    ("convert-gamma-word", CONVERT + ("--theta-gamma", "abc"), "not a number", None),
    ("convert-gamma-100", CONVERT + ("--theta-gamma", "100"), "out of range", None),
    ("convert-outtype", CONVERT + ("--outtype", "Q9_9"), "unknown --outtype", None),
    ("convert-selective", CONVERT + ("--selective-layers", "blk.99.nothing"), "matches no", None),
    ("convert-output-dir", ("convert", "--input", "{tiny}", "--output", "{out}"), "directory", None),
    ("convert-output-proc", ("convert", "--input", "{tiny}", "--output", "/proc/nkat-corpus.gguf"),
     "output directory", None),
    ("convert-output-missing-dir", ("convert", "--input", "{tiny}", "--output", "/nonexistent-dir/x.gguf"),
     "output directory", None),
    ("convert-reference-missing", CONVERT + ("--reference", "{out}/missing.gguf"), "no such file", None),
    ("convert-reference-text", CONVERT + ("--reference", "{file}"), "not a gguf", TEXT),
    ("convert-calib-missing", CONVERT + ("--calib-text", "{out}/missing.txt"), "no such text file", None),
    ("convert-calib-not-utf8", CONVERT + ("--calib-text", "{file}"), "not utf-8", NOT_UTF8),
    ("convert-imatrix-missing", CONVERT + ("--imatrix", "{out}/missing.dat"), "no such imatrix file", None),
    ("convert-so8t-bogus", CONVERT + ("--so8t", "bogus"), "so8t", None),
    ("convert-so8t-seed-alone", CONVERT + ("--so8t-seed", "3"), "--so8t-seed", None),
    ("convert-so8t-missing", CONVERT + ("--so8t", "file:{out}/missing.safetensors", "--imatrix", "none"),
     "no such so8t checkpoint", None),
    ("convert-so8t-imatrix-file", CONVERT + ("--so8t", "hadamard", "--imatrix", "{file}"), "--imatrix", TEXT),
    ("convert-same-file-type-string", CONVERT_FILE + ("--outtype", "same"), "file_type",
     with_metadata({"general.file_type": string("Q4_0")}, "tiny")),
    ("convert-same-file-type-array", CONVERT_FILE + ("--outtype", "same"), "file_type",
     with_metadata({"general.file_type": array([2, 3], GGUFValueType.UINT32)}, "tiny")),
    ("convert-threads-word", CONVERT + ("--threads", "abc"), "threads", None),
    ("convert-input-dir", ("convert", "--input", "{out}", "--output", "{out}/c.gguf"), "not a file", None),
    # perplexity
    ("perplexity-ctx-1", ("perplexity", "-m", "{tiny}", "--ctx", "1"), "--ctx", None),
    ("perplexity-ctx-0", ("perplexity", "-m", "{tiny}", "--ctx", "0"), "--ctx", None),
    ("perplexity-ctx-negative", ("perplexity", "-m", "{tiny}", "--ctx", "-5"), "--ctx", None),
    ("perplexity-ctx-billion", ("perplexity", "-m", "{tiny}", "--ctx", "1000000000"), "trained context", None),
    ("perplexity-ctx-4096", ("perplexity", "-m", "{tiny}", "--ctx", "4096"), "trained context", None),
    ("perplexity-chunks-0", ("perplexity", "-m", "{tiny}", "--chunks", "0"), "--chunks", None),
    ("perplexity-gamma-negative", ("perplexity", "-m", "{nkat}", "--gamma", "-1"), "--gamma", None),
    ("perplexity-gamma-nan", ("perplexity", "-m", "{nkat}", "--gamma", "nan"), "--gamma", None),
    ("perplexity-gamma-100", PPL[:1] + ("-m", "{nkat}", "--ctx", "64", "--gamma", "100"), "out of range", None),
    ("perplexity-gamma-no-theta", ("perplexity", "-m", "{plain}", "--gamma", "1"), "carries no theta", None),
    ("perplexity-text-missing", ("perplexity", "-m", "{tiny}", "--text", "{out}/missing.txt"), "no such text", None),
    ("perplexity-text-not-utf8", ("perplexity", "-m", "{tiny}", "--text", "{file}"), "not utf-8", NOT_UTF8),
    ("perplexity-text-short", ("perplexity", "-m", "{tiny}", "--ctx", "64", "--text", "{file}"), "too short",
     bytes_file(b"just a few words")),
    ("perplexity-model-missing", ("perplexity", "-m", "{out}/missing.gguf"), "no such file", None),
    ("perplexity-model-dir", ("perplexity", "-m", "{out}"), "not a file", None),
    # bench
    ("bench-prompt-0", ("bench", "-m", "{tiny}", "--n-prompt", "0"), "--n-prompt", None),
    ("bench-prompt-huge", ("bench", "-m", "{tiny}", "--n-prompt", "100000"), "trained context", None),
    ("bench-repetitions-0", ("bench", "-m", "{tiny}", "-r", "0"), "repetitions", None),
    ("bench-gamma-nan", ("bench", "-m", "{nkat}", "--gamma", "nan"), "--gamma", None),
    # compare
    ("compare-no-theta", ("compare", "-m", "{plain}", "--ctx", "64", "-r", "1"), "carries no theta", None),
    ("compare-reference-missing", ("compare", "-m", "{nkat}", "--reference", "{out}/missing.gguf"),
     "no such file", None),
    ("compare-reference-text", ("compare", "-m", "{nkat}", "--reference", "{file}"), "not a gguf", TEXT),
    ("compare-reference-hparams", ("compare", "-m", "{nkat}", "--reference", "{file}"), "block_count", BLOCK0),
    ("compare-ctx-1", ("compare", "-m", "{nkat}", "--ctx", "1"), "--ctx", None),
    ("compare-ctx-billion", ("compare", "-m", "{nkat}", "--ctx", "1000000000"), "trained context", None),
    ("compare-chunks-0", ("compare", "-m", "{nkat}", "--chunks", "0"), "--chunks", None),
    ("compare-model-missing", ("compare", "-m", "{out}/missing.gguf"), "no such file", None),
    # quality
    ("quality-ctx-1", ("quality", "--input", "{tiny}", "--ctx", "1"), "--ctx", None),
    ("quality-ctx-billion", ("quality", "--input", "{tiny}", "--ctx", "1000000000"), "trained context", None),
    ("quality-reference-missing", ("quality", "--input", "{tiny}", "--reference", "{out}/missing.gguf"),
     "no such file", None),
    ("quality-outtype", ("quality", "--input", "{tiny}", "--outtype", "Q9_9"), "unknown --outtype", None),
    ("quality-rank-0", ("quality", "--input", "{tiny}", "--theta-rank", "0"), "--theta-rank", None),
    ("quality-input-hparams", ("quality", "--input", "{file}"), "block_count", BLOCK0),
    # optimize
    ("optimize-ranks-word", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--ranks", "a,b"), "--ranks", None),
    ("optimize-ranks-0", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--ranks", "0"), "--ranks", None),
    ("optimize-ranks-huge", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--ranks", "2,1000"), "larger than",
     None),
    ("optimize-gamma-inverted", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--gamma-range", "0.9,0.1"),
     "inverted", None),
    ("optimize-gamma-word", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--gamma-range", "a,b"),
     "--gamma-range", None),
    ("optimize-mode", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--mode", "bogus"), "--mode", None),
    ("optimize-trials-0", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--mode", "custom", "--trials", "0"),
     "--trials", None),
    ("optimize-ctx-1", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--ctx", "1"), "--ctx", None),
    ("optimize-ctx-billion", ("optimize", "-m", "{tiny}", "-o", "{out}/opt", "--ctx", "1000000000"),
     "trained context", None),
    ("optimize-model-missing", ("optimize", "-m", "{out}/missing.gguf", "-o", "{out}/opt"), "no such file", None),
    ("optimize-model-text", ("optimize", "-m", "{file}", "-o", "{out}/opt"), "not a gguf", TEXT),
    ("optimize-model-hparams", ("optimize", "-m", "{file}", "-o", "{out}/opt"), "block_count", BLOCK0),
    # exports
    ("adapter-output-dir", ("export", "adapter", "{nkat}", "-o", "{out}"), "directory", None),
    ("adapter-type", ("export", "adapter", "{nkat}", "-o", "{out}/a.gguf", "--type", "Q4_0"), "--type", None),
    ("adapter-gamma-100", ("export", "adapter", "{nkat}", "-o", "{out}/a.gguf", "--gamma", "100"), "out of range",
     None),
    ("adapter-model-missing", ("export", "adapter", "{out}/missing.gguf", "-o", "{out}/a.gguf"), "no such file",
     None),
    ("adapter-onto-input", ("export", "adapter", "{file}", "-o", "{file}"), "input model",
     with_metadata({}, "nkat")),
    ("ollama-name", ("export", "ollama", "{nkat}", "--output-dir", "{out}/o", "--name", "bad name!"),
     "ollama model name", None),
    ("ollama-outtype-alone", ("export", "ollama", "{nkat}", "--output-dir", "{out}/o", "--outtype", "Q8_0"),
     "--merged", None),
    ("ollama-merged-outtype", ("export", "ollama", "{nkat}", "--output-dir", "{out}/o", "--merged", "--outtype",
                               "Q9_9"), "unknown --outtype", None),
    ("ollama-output-file", ("export", "ollama", "{nkat}", "--output-dir", "{file}"), "is a file", TEXT),
    ("kobold-gamma-negative", ("export", "kobold", "{nkat}", "--output-dir", "{out}/k", "--gamma", "-1"), "--gamma",
     None),
    ("kobold-threads-0", ("export", "kobold", "{nkat}", "--output-dir", "{out}/k", "--threads", "0"), "--threads",
     None),
    # serve, qc, others
    ("serve-port", ("serve", "{tiny}", "--port", "99999"), "--port", None),
    ("serve-ctx-5", ("serve", "{tiny}", "--ctx", "5"), "--ctx", None),
    ("serve-ctx-billion", ("serve", "{tiny}", "--ctx", "1000000000"), "trained context", None),
    ("serve-gamma-nan", ("serve", "{nkat}", "--gamma", "nan"), "--gamma", None),
    ("serve-model-missing", ("serve", "{out}/missing.gguf"), "no such file", None),
    ("serve-model-hparams", ("serve", "{file}"), "block_count", BLOCK0),
    ("qc-pre-text", ("qc", "bake", "--pre", "{file}", "--post", "{tiny}"), "not a gguf", TEXT),
    ("qc-pre-hparams", ("qc", "bake", "--pre", "{file}", "--post", "{tiny}"), "block_count", BLOCK0),
    ("qc-post-missing", ("qc", "bake", "--pre", "{tiny}", "--post", "{out}/missing.gguf"), "--post", None),
    ("qc-text-missing", ("qc", "bake", "--pre", "{tiny}", "--post", "{tiny}", "--text", "{out}/missing.txt"),
     "no such text", None),
    ("backends-model-missing", ("backends", "{out}/missing.gguf"), "no such file", None),
    ("unknown-command", ("frobnicate",), "no such command", None),
    ("unknown-option", ("perplexity", "--frobnicate"), "no such option", None),
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
    Case("theta-merged-nan", ("export", "ollama", "{file}", "--output-dir", "{out}/o", "--merged"), "a_scale",
         scale_set("a_scale", float("nan")), slow=True),
    Case("theta-merged-float", ("export", "ollama", "{file}", "--output-dir", "{out}/o", "--merged"), "int8",
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
    cases += [Case(f"imatrix-{name}", CONVERT + ("--imatrix", "{file}"), expect, build, suffix=".imatrix")
              for name, build, expect in IMATRIX]
    cases += [Case(f"so8t-{name}", CONVERT + ("--so8t", "file:{file}", "--imatrix", "none"), expect, build,
                   suffix=".safetensors") for name, build, expect in SO8T]
    cases += [Case(name, args, expect, build) for name, args, expect, build in OPTIONS]
    return cases + CONTROLS + SLOW
