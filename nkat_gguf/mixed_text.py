"""`--calib-text mix`: calibration prose of several kinds, from sources every machine here ships, disjoint
from both evaluation texts.

Sources, interleaved paragraph by paragraph so every window holds all kinds:
- the pydoc calibration split (nkat_gguf.texts),
- docstrings of the Python standard library, read with `ast` from its source files (nothing imported),
- manual pages of section 1 (/usr/share/man/man1, gzip'ed roff, markup stripped).
Files are taken in the order of the sha256 of their names (a fixed spread over the whole library, not the
first letters of the alphabet). Any paragraph sharing a run of RUN_WORDS words with either evaluation text
is dropped; /usr/share/common-licenses and /usr/share/doc are never read (the licence evaluation text).
A missing source is left out and the text's `source` names what was used.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import re
import sysconfig
from collections.abc import Callable, Iterator
from itertools import zip_longest
from pathlib import Path

from nkat_gguf.errors import InputError
from nkat_gguf.texts import Text, builtin_text

RUN_WORDS = 10
MIX_CHARACTERS = 400_000  # ~100k tokens: six times the default 16,384 calibration tokens
SHORTEST_PARAGRAPH = 80
MAN_DIR = Path("/usr/share/man/man1")
_WORD = re.compile(r"\w+")
_ROFF_ESCAPE = re.compile(r"\\(f(\[[^]]*\]|\(..|.)|\(..|\[[^]]*\]|\*(\(..|\[[^]]*\]|.)|s[-+]?\d|[&|^%:ec])")
_ROFF_TEXT_MACROS = {"B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SB", "SM", "SH", "SS", "TP", "IP"}
_ROFF_BREAKS = {"PP", "LP", "P", "SH", "SS", "TP", "IP", "sp", "br"}


def mixed_text(characters: int = MIX_CHARACTERS) -> Text:
    """The mix described in the module docstring, cut at about `characters`."""
    sources: dict[str, Callable[[], Iterator[str]]] = {"pydoc": _pydoc_paragraphs, "stdlib": _docstring_paragraphs,
                                                       "man1": _man_paragraphs}
    present = {name: make() for name, make in sources.items() if name != "man1" or MAN_DIR.is_dir()}
    runs, checked = evaluation_runs()
    kept: list[str] = []
    total = 0
    for row in zip_longest(*(_disjoint(it, runs) for it in present.values())):
        for paragraph in row:
            if paragraph is not None and total < characters:
                kept.append(paragraph)
                total += len(paragraph) + 2
        if total >= characters:
            break
    if not kept:
        raise InputError("--calib-text mix found no paragraph in " + ", ".join(present))
    absent = [name for name in sources if name not in present]
    source = "mix:" + ",".join(present) + f" (disjoint from {checked})" + (f"; absent: {', '.join(absent)}" if absent else "")
    return Text("\n\n".join(kept), source)


def evaluation_runs() -> tuple[set[int], str]:
    """Hashes of every RUN_WORDS-word run of the evaluation texts present, and which those were."""
    runs: set[int] = set()
    checked = []
    for split in ("evaluation", "licenses"):
        try:
            content = builtin_text(split).content
        except InputError:
            continue  # no licence files on this machine: no licence evaluation text either
        runs |= word_runs(content)
        checked.append(split)
    return runs, "+".join(checked)


def word_runs(text: str) -> set[int]:
    words = [w.lower() for w in _WORD.findall(text)]
    return {hash(tuple(words[i:i + RUN_WORDS])) for i in range(len(words) - RUN_WORDS + 1)}


def _disjoint(paragraphs: Iterator[str], runs: set[int]) -> Iterator[str]:
    for paragraph in paragraphs:
        if len(paragraph) >= SHORTEST_PARAGRAPH and not word_runs(paragraph) & runs:
            yield paragraph


def _spread(paths: list[Path], root: Path) -> list[Path]:
    return sorted(paths, key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())


def _pydoc_paragraphs() -> Iterator[str]:
    for paragraph in builtin_text("calibration").content.split("\n\n"):
        yield paragraph.strip()


def _docstring_paragraphs() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not any(part == "site-packages" or "test" in part for part in p.relative_to(root).parts)]
    for path in _spread(files, root):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for paragraph in (doc or "").split("\n\n"):
                    yield paragraph.strip()


def _man_paragraphs() -> Iterator[str]:
    for path in _spread([p for p in MAN_DIR.glob("*.gz") if p.is_file()], MAN_DIR):
        try:
            roff = gzip.decompress(path.read_bytes()).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError):
            continue
        yield from strip_roff(roff).split("\n\n")


def strip_roff(roff: str) -> str:
    """The prose of a man page: text lines and the arguments of font/heading macros, escapes removed,
    paragraph macros and blank lines as paragraph breaks."""
    lines = []
    for line in roff.splitlines():
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro in _ROFF_BREAKS:
                lines.append("")
            if macro in _ROFF_TEXT_MACROS and rest:
                lines.append(rest.replace('"', ""))
            continue
        lines.append(line)
    text = _ROFF_ESCAPE.sub("", "\n".join(lines)).replace("\\-", "-").replace("\\ ", " ")
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)
