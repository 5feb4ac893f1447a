"""Text sampled from a model itself (`--calib-text self`): data-free calibration on the distribution the
KL divergence against the reference measures, for any architecture llama.cpp runs.

Batched: every sequence is its own sequence id in one llama.cpp context, so each step decodes one token
of every sequence in one batch (one graph per step, not per sequence). Tokens are drawn from the full
softmax (temperature 1) with a seeded numpy generator, end-of-generation tokens excluded so every sequence
has its full length; nothing comes from outside the model file.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import llama_cpp
import numpy as np
from tqdm import tqdm

from nkat_gguf.engine.llama.native_log import captured_llama_log
from nkat_gguf.errors import InputError, NkatError


def sample_sequences(model_path: Path, sequences: int, length: int, seed: int, threads: int = 0,
                     progress: bool = True) -> list[list[int]]:
    """`sequences` token lists of `length` tokens each, from BOS (or EOS for a model without BOS)."""
    with captured_llama_log() as log:
        model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise InputError(f"llama.cpp cannot load {model_path.name}: {log.reason('load failed')}")
    ctx = batch = None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        if llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_NONE or n_vocab == 0:
            raise InputError(f"{model_path.name} has no vocabulary: --calib-text self samples the model's own "
                             "tokens; give --calib-text FILE")
        start = llama_cpp.llama_vocab_bos(vocab)
        start = start if start >= 0 else llama_cpp.llama_vocab_eos(vocab)
        if start < 0:
            raise InputError(f"{model_path.name} has neither BOS nor EOS to start sampling from; give --calib-text FILE")
        allowed = np.array([not llama_cpp.llama_vocab_is_eog(vocab, t) for t in range(n_vocab)])
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = sequences * length, sequences, sequences
        cparams.n_seq_max = sequences
        cparams.n_threads = cparams.n_threads_batch = threads or os.cpu_count() or 1
        with captured_llama_log() as log:
            ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise InputError(f"llama.cpp cannot create a context of {sequences} sequences for {model_path.name}: "
                             f"{log.reason('init failed')}")
        batch = llama_cpp.llama_batch_init(sequences, 0, 1)
        return _sample(ctx, batch, sequences, length, start, allowed, np.random.default_rng(seed), progress)
    finally:
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def _sample(ctx: object, batch: object, sequences: int, length: int, start: int, allowed: np.ndarray,
            rng: np.random.Generator, progress: bool) -> list[list[int]]:
    n_vocab = allowed.size
    tokens = np.full((sequences, length), start, dtype=np.int32)
    batch.n_tokens = sequences
    np.ctypeslib.as_array(batch.n_seq_id, shape=(sequences,))[:] = 1
    np.ctypeslib.as_array(batch.logits, shape=(sequences,))[:] = 1
    for i in range(sequences):
        batch.seq_id[i][0] = i
    slots = np.ctypeslib.as_array(batch.token, shape=(sequences,))
    positions = np.ctypeslib.as_array(batch.pos, shape=(sequences,))
    for step in tqdm(range(length - 1), desc="sampling calibration text", unit="step", disable=not progress,
                     leave=False):
        slots[:], positions[:] = tokens[:, step], step
        status = llama_cpp.llama_decode(ctx, batch)
        if status != 0:
            raise NkatError(f"llama.cpp could not decode sampling step {step} (llama_decode returned {status})")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(sequences, n_vocab)).astype(np.float64)
        logits[:, ~allowed] = -np.inf
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(probabilities, axis=1)
        draws = rng.random(sequences) * cdf[:, -1]
        tokens[:, step + 1] = np.minimum((cdf < draws[:, None]).sum(axis=1), n_vocab - 1)
    return tokens.tolist()


def detokenize(model_path: Path, sequences: list[list[int]]) -> list[str]:
    """Each sequence's text (special tokens render as nothing), BOS/EOS start included as nothing."""
    with captured_llama_log() as log:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise InputError(f"llama.cpp cannot load the tokenizer of {model_path.name}: {log.reason('load failed')}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        buffer = ctypes.create_string_buffer(256)
        pieces: dict[int, bytes] = {}
        texts = []
        for sequence in sequences:
            out = bytearray()
            for token in sequence[1:]:
                if token not in pieces:
                    n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
                    pieces[token] = buffer.raw[:max(n, 0)]
                out += pieces[token]
            texts.append(out.decode("utf-8", errors="replace"))
        return texts
    finally:
        llama_cpp.llama_model_free(model)
