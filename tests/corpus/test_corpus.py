"""Every malformed input through the real command line: a clean refusal, or (controls) a clean success.

A refusal is: exit code > 0 (not a signal), no traceback, at most two lines on stderr naming the
problem (its expected words are looked for after every path of the run is replaced by `<path>`, so the
file's own name, `input.gguf` or the case's directory, can never supply them), nothing new in the output directory (the process's working directory too), every input's
sha256 unchanged. The cases run two at a time (each is a fresh interpreter, mostly import time), once
per session, in a fixture; the parametrised test then judges each. Run the corpus alone with
`pytest tests/corpus -m "not slow"` (or without -m for the slow cases too).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType

from tests.corpus.cases import all_cases
from tests.corpus.generate import Case, Inputs
from tools.synthetic_model import build_llama_gguf

CASES = all_cases()
TEMPORARY_NAME = re.compile(r"\.nkat-tmp-\S*?\.tmp")  # nkat_gguf/format/atomic.py's staging names
PARALLEL = 2
MAX_MESSAGE_LINES = 2


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    changed_inputs: list[str]
    left_behind: list[str]
    missing: list[str]  # controls: expected outputs that did not appear
    paths: tuple[str, ...]  # every path the command line and the harness used, longest first

    def message(self) -> str:
        """stderr in lower case with every path of the run, and the temporary names derived from them,
        replaced by `<path>`."""
        text = self.stderr
        for path in self.paths:
            text = text.replace(path, "<path>")
        return TEMPORARY_NAME.sub("<path>", text).lower()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def corpus_inputs(tiny_f32: Path, tiny_nkat: Path, tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    plain = build_llama_gguf(tmp_path_factory.mktemp("corpus-base") / "plain-q4_0.gguf",
                             weight_type=GGMLQuantizationType.Q4_0)
    return Inputs(tiny=tiny_f32, nkat=tiny_nkat, plain=plain)


def run_case(case: Case, inputs: Inputs, root: Path) -> Run:
    work = root / case.id
    out = work / "out"
    out.mkdir(parents=True)
    file = work / f"input{case.suffix}"
    if case.build is not None:
        case.build(inputs, file)
    watched = [inputs.tiny, inputs.nkat, inputs.plain] + ([file] if file.exists() else [])
    before = {p: sha256(p) for p in watched}
    args = [a.format(tiny=inputs.tiny, nkat=inputs.nkat, plain=inputs.plain, file=file, out=out) for a in case.args]
    proc = subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *args], cwd=out, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COLUMNS": "200"})
    changed = [str(p) for p in watched if sha256(p) != before[p]]
    present = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    missing = [c for c in case.creates if not (out / c).is_file()]
    file.unlink(missing_ok=True)  # the corpus is built one case at a time: disk stays small
    files = (inputs.tiny, inputs.nkat, inputs.plain, file)
    paths = {str(p) for p in (*files, out, work)} | {p.name for p in files}  # messages may give a file's name only
    paths |= {a for a in args if "/" in a} | {str(Path(a).resolve()) for a in args if "/" in a}
    return Run(proc.returncode, proc.stdout, proc.stderr, changed, present, missing,
               tuple(sorted(paths, key=len, reverse=True)))


@pytest.fixture(scope="session")
def corpus_runs(request: pytest.FixtureRequest, corpus_inputs: Inputs,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Run every selected case (after -m/-k deselection), PARALLEL at a time."""
    selected = {item.callspec.params["case"].id: item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_corpus_case"}
    root = tmp_path_factory.mktemp("corpus")
    with ThreadPoolExecutor(PARALLEL) as pool:
        runs = pool.map(lambda c: (c.id, run_case(c, corpus_inputs, root)), selected.values())
        return dict(runs)


def test_corpus_is_large_and_has_controls() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 150
    assert sum(c.expect is None for c in CASES) >= 5


def test_no_expectation_is_met_by_a_path() -> None:
    """An expected word that a path could contain would pass even if the message said nothing: the case id
    (its directory), the input's name and the placeholders' files must not contain any of them."""
    for case in CASES:
        names = (case.id, f"input{case.suffix}", "out", "tiny-f32.gguf", "tiny.nkat.gguf", "plain-q4_0.gguf",
                 "corpus0", "pytest-of-root", ".nkat-tmp-")
        for word in case.words:
            assert word == word.lower(), f"{case.id}: expectations are lower case, got {word!r}"
            assert not any(word in name.lower() for name in names), f"{case.id}: {word!r} is in a path"
            assert not any(word in a.lower() for a in case.args if "{" in a), f"{case.id}: {word!r} is in {case.args}"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_corpus_case(case: Case, corpus_runs: dict[str, Run]) -> None:
    run = corpus_runs[case.id]
    output = run.stdout + run.stderr
    assert "Traceback" not in output, output
    assert not run.changed_inputs, f"inputs modified: {run.changed_inputs}"
    if case.expect is None:  # a valid control: must pass through the same harness
        assert run.returncode == 0, output
        assert not run.missing, f"expected outputs missing: {run.missing}; present: {run.left_behind}"
        return
    assert run.returncode > 0, f"exit {run.returncode} (negative: killed by a signal)\n{output}"
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= MAX_MESSAGE_LINES, run.stderr
    message = run.message()
    assert not [w for w in case.words for p in run.paths if w in p.lower()], f"an expected word is in {run.paths}"
    for word in case.words:
        assert word in message, f"expected {word!r} in the message without its paths: {message}"
    assert run.left_behind == [], f"left behind: {run.left_behind}"
