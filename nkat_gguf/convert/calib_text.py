"""What `--calib-text` names: the built-in pydoc split (default), `mix`, `self`, or a UTF-8 file.

`self` is sampled once per (model, seed) and kept as text in the calibration cache, so the statistics'
cache keys (text sha256) and every later convert of the model see the same text. A file literally named
`self` or `mix` is given as ./self or ./mix.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from nkat_gguf.engine.calibrate.calibration import WINDOW, calibration_cache_dir
from nkat_gguf.engine.calibrate.sampling import detokenize, sample_sequences
from nkat_gguf.format.atomic import atomic_output
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.mixed_text import mixed_text
from nkat_gguf.texts import Text, load_text

KEYWORDS = ("self", "mix")
# 40 sequences of one window each: re-tokenizing the detokenized text merges some tokens, and the default
# 32 windows of calibration must still fit.
SELF_SEQUENCES = 40
SELF_SEED = 0


def calibration_text(option: str | Path | None, model_path: Path, threads: int = 0, progress: bool = True,
                     seed: int = SELF_SEED) -> Text:
    """The calibration text `option` names; `model_path` is the model `self` samples (the reference)."""
    if option is not None and str(option) == "mix":
        return mixed_text()
    if option is not None and str(option) == "self":
        return self_text(model_path, seed, threads, progress)
    return load_text(option, "calibration")


def self_text(model_path: Path, seed: int = SELF_SEED, threads: int = 0, progress: bool = True,
              sequences: int = SELF_SEQUENCES, length: int = WINDOW, cache: bool = True) -> Text:
    """`sequences` × `length` tokens sampled from the model (engine.sampling), as text, cached per model and seed."""
    model_sha = sha256_file(model_path)
    source = f"self:{model_path.name},seed={seed},{sequences}x{length}"
    key = hashlib.sha256(f"self|{model_sha}|{seed}|{sequences}x{length}".encode()).hexdigest()[:32]
    path = calibration_cache_dir() / f"self-{key}.txt"
    if cache and path.is_file():
        return Text(path.read_text(encoding="utf-8"), source)
    texts = detokenize(model_path, sample_sequences(model_path, sequences, length, seed, threads, progress))
    content = "\n\n".join(texts)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, suffix=".txt") as tmp:
            Path(tmp).write_text(content, encoding="utf-8")
    return Text(content, source)
