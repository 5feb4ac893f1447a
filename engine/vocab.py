"""The model's own tokenizer, loaded alone (vocab only): for work that needs tokens but not a context."""

from __future__ import annotations

from pathlib import Path

import llama_cpp

from nkat_gguf.engine.native_log import captured_llama_log
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout


def tokenize(model_path: Path, text: str) -> list[int]:
    """llama.cpp's own tokenizer for the model (vocab only, nothing else loaded); BOS per the model's flag."""
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
        return vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    finally:
        vocab.close()
