"""The model's own tokenizer, loaded alone (vocab only): for work that needs tokens but not a context."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp

from nkat_gguf.engine.llama.native_log import captured_llama_log
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout


def tokenize(model_path: Path, text: str) -> list[int]:
    """llama.cpp's own tokenizer for the model (vocab only, nothing else loaded); BOS per the model's flag."""
    return tokens_and_bos(model_path, text)[0]


def tokens_and_bos(model_path: Path, text: str) -> tuple[list[int], int | None]:
    """`tokenize`'s tokens, and the BOS id when the model adds one (else None): windows cut from the
    tokens start with it, as llama-perplexity and llama-imatrix do."""
    read_layout(model_path)  # a file that is not GGUF at all says so
    with captured_llama_log() as log:
        try:
            vocab = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        except ValueError:
            vocab = None
    if vocab is None:
        raise InputError(f"llama.cpp cannot load the tokenizer of {model_path.name}: {log.reason('its tokenizer metadata is missing or invalid')}")
    try:
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(vocab.model)))
        tokens = vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
        return tokens, (vocab.token_bos() if add_bos else None)
    finally:
        vocab.close()


def longest_piece_bytes(llm: llama_cpp.Llama) -> int:
    """The most bytes of text any one token of a loaded model stands for (special tokens as no text).

    llama.cpp's tokenizers cover the text with token pieces, so a text of B bytes needs at least
    B / longest_piece_bytes tokens: a bound that refuses a prompt far over the context without first
    tokenizing it, which takes time in proportion to the text while it holds the server's generation slot.
    """
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buffer = ctypes.create_string_buffer(256)
    longest = 0
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        # no lstrip, no special rendering; a negative result is the size the piece would need
        longest = max(longest, abs(llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)))
    return longest
