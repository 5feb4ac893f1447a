"""The export targets and the files they write, named once.

`nkat-gguf export TARGET` is a subcommand per target, `ExportReport.kind` says which one ran, and
`backends` prints the exact export commands and the paths the next command reads: all three read the
names here. Imports nothing heavy, so the CLI reads them at start-up without loading llama.cpp.
"""

from __future__ import annotations

import re
from pathlib import Path

ADAPTER, OLLAMA, KOBOLD = "adapter", "ollama", "kobold"  # a LoRA adapter GGUF, an Ollama directory, a .kcpps
MODELFILE = "Modelfile"  # in the Ollama directory


def export_stem(model: Path) -> str:
    """File-name-safe base name of every exported file: `foo.nkat.gguf` -> `foo`."""
    name = model.name.removesuffix(".gguf").removesuffix(".nkat")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def ollama_name(model: Path) -> str:
    """The default `--name`: the export stem in lower case."""
    return export_stem(model).lower()


def kcpps_name(model: Path) -> str:
    """The KoboldCpp config the kobold export writes for `model`."""
    return f"{export_stem(model)}.kcpps"
