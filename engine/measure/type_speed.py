"""How long each quantization type's matrix products take on this CPU, as llama.cpp runs them: the allocator's
price of speed (convert/allocate.py), so a type is not chosen for lower error alone when it is slower.

The kernels differ more than the bits do: llama.cpp repacks Q4_0 and IQ4_NL for the CPU's SIMD at load (the
CPU_REPACK buffer) and not Q4_1, which is slower to generate with and much slower to prompt with. A probe model
per type (two llama layers of width 1,024, every weight the same 1,024 × 1,024 matrix quantized once at that
type, 14.7 M values, a 256-token vocabulary cut from the default model's) is loaded and timed: a 64-token
prompt and single-token decodes, each the fastest of interleaved rounds. A type's price is its seconds per
weight value, prompt (per token) and decode added, so a file is priced for both. It takes seconds on a quiet
machine and is cached per CPU, llama.cpp build and thread count ($NKAT_CACHE_DIR/type-speed; delete it to
measure again): the same machine always prices alike, so the same convert chooses the same types.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import llama_cpp
import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType

from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.llama.adapter import cache_root
from nkat_gguf.engine.llama.native_log import captured_llama_log
from nkat_gguf.engine.llama.quantize import quantize_rows
from nkat_gguf.errors import InputError
from nkat_gguf.format.atomic import atomic_output, work_dir
from nkat_gguf.format.gguf_file import TensorSpec, Value, read_layout, write_gguf

PROBE_VERSION = 1  # bump when the probe changes: cached prices of another probe are not comparable
WIDTH, LAYERS, HEADS, VOCAB = 1024, 2, 8, 256
PROMPT_TOKENS, DECODE_TOKENS, ROUNDS = 64, 8, 5
_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def type_seconds(types: list[GGMLQuantizationType], threads: int = 0) -> dict[str, float]:
    """Seconds per weight value of one token's product (prompt + decode) by type name, measured once per CPU,
    llama.cpp build and thread count and read from the cache after."""
    path = cache_path(threads)
    try:
        known: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        known = {}  # a damaged entry is measured again and replaced
    missing = [t for t in types if t.name not in known]
    if missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the type speed cache {path.parent}: {exc.strerror} "
                             "(set NKAT_CACHE_DIR)") from None
        with work_dir(path.parent, "probe") as probes:  # a killed run's probes go with the next run's
            known |= _measure(missing, threads, probes)
        with atomic_output(path) as tmp:
            Path(tmp).write_text(json.dumps(known, indent=1, sort_keys=True))
    return {t.name: known[t.name] for t in types}


def cache_path(threads: int) -> Path:
    """This machine's cached prices: a JSON object, type name -> seconds per weight value."""
    return cache_root() / "type-speed" / f"{_cache_key(threads)}.json"


def _cache_key(threads: int) -> str:
    """The CPU (its model and flags, like tools/bootstrap.sh's wheel key), the llama.cpp build, the threads."""
    try:
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        cpu = [platform.processor()]
    raw = "|".join([f"v{PROBE_VERSION}", platform.machine(), *cpu, llama_cpp.__version__,
                    llama_cpp.llama_print_system_info().decode(), str(threads)])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _measure(types: list[GGMLQuantizationType], threads: int, directory: Path) -> dict[str, float]:
    """Every type's probe loaded at once and timed in interleaved rounds (each round visits every type), so a
    busy spell on a shared machine slows all types alike; the best round of each counts."""
    matrix = np.random.default_rng(0).standard_normal((WIDTH, WIDTH), dtype=np.float32) / np.sqrt(WIDTH)
    ones = np.ones(WIDTH, dtype=np.float32)  # an importance matrix, for the types llama.cpp requires one for
    paths = {t: directory / f"probe-{t.name}.gguf" for t in types}
    models: dict[GGMLQuantizationType, llama_cpp.Llama] = {}
    try:
        for ggml_type, path in paths.items():
            _write_probe(path, quantize_rows("probe", matrix, ggml_type, ones), ggml_type)
            with captured_llama_log():
                models[ggml_type] = llama_cpp.Llama(str(path), n_ctx=PROMPT_TOKENS + DECODE_TOKENS + 8,
                                                    n_batch=PROMPT_TOKENS, n_threads=threads or None, verbose=False)
        prompt, decode = dict.fromkeys(types, float("inf")), dict.fromkeys(types, float("inf"))
        for _ in range(ROUNDS):
            for ggml_type, llm in models.items():
                p, d = _times_per_token(llm)
                prompt[ggml_type], decode[ggml_type] = min(prompt[ggml_type], p), min(decode[ggml_type], d)
        return {t.name: (prompt[t] + decode[t]) / (LAYERS * len(_WEIGHTS) * WIDTH * WIDTH) for t in types}
    finally:
        for llm in models.values():
            llm.close()


def _write_probe(path: Path, quantized: np.ndarray, ggml_type: GGMLQuantizationType) -> None:
    """LAYERS llama blocks whose every weight holds the same quantized WIDTH × WIDTH matrix (quantized once),
    the default model's tokenizer cut to VOCAB tokens (its merges dropped: nothing is tokenized)."""
    source = read_layout(default_model_path())
    tokenizer = {k: v for k, v in source.metadata.items() if k.startswith("tokenizer.")
                 and not (k.endswith("_token_id") and int(v.data) >= VOCAB)}  # the cut vocabulary's own ids only
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in tokenizer:
            tokenizer[key] = replace(tokenizer[key], data=tokenizer[key].data[:VOCAB])
    tokenizer["tokenizer.ggml.merges"] = Value(GGUFValueType.ARRAY, [], GGUFValueType.STRING)
    metadata = {"general.architecture": "llama", "general.type": "model", "general.name": "nkat-type-speed-probe",
                "llama.block_count": LAYERS, "llama.context_length": 256, "llama.embedding_length": WIDTH,
                "llama.feed_forward_length": WIDTH, "llama.attention.head_count": HEADS,
                "llama.attention.head_count_kv": HEADS, "llama.rope.freq_base": 10000.0,
                "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": VOCAB,
                "llama.rope.dimension_count": WIDTH // HEADS} | tokenizer
    f32 = GGMLQuantizationType.F32
    specs = [TensorSpec("token_embd.weight", (VOCAB, WIDTH), f32)]
    for i in range(LAYERS):
        specs += [TensorSpec(f"blk.{i}.attn_norm.weight", (WIDTH,), f32),
                  TensorSpec(f"blk.{i}.ffn_norm.weight", (WIDTH,), f32)]
        specs += [TensorSpec(f"blk.{i}.{k}.weight", (WIDTH, WIDTH), ggml_type) for k in _WEIGHTS]
    specs += [TensorSpec("output_norm.weight", (WIDTH,), f32), TensorSpec("output.weight", (VOCAB, WIDTH), f32)]

    def produce(spec: TensorSpec) -> np.ndarray:
        if len(spec.shape) == 1:
            return np.ones(spec.shape, dtype=np.float32)
        return np.full(spec.shape, 0.01, dtype=np.float32) if spec.type == f32 else quantized

    write_gguf(path, metadata, specs, produce)


def _times_per_token(llm: llama_cpp.Llama) -> tuple[float, float]:
    """Seconds of one prompt token (in a PROMPT_TOKENS batch) and of the fastest of DECODE_TOKENS decoded tokens,
    each timed alone: on a busy machine the fastest token is the one nothing else interrupted."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(list(range(1, PROMPT_TOKENS + 1)))
    prompt = (time.perf_counter() - start) / PROMPT_TOKENS
    decode = float("inf")
    for token in range(DECODE_TOKENS):
        start = time.perf_counter()
        llm.eval([1 + token % (VOCAB - 1)])
        decode = min(decode, time.perf_counter() - start)
    return prompt, decode
