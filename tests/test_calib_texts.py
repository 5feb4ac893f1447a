"""`--calib-text self` and `--calib-text mix`: deterministic, disjoint from both evaluation texts, one clear line
for a model without a vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest

import nkat_gguf.mixed_text as mixed
from nkat_gguf.convert.calib_text import calibration_text, self_text
from nkat_gguf.engine.calibrate.sampling import sample_sequences
from nkat_gguf.engine.llama.vocab import tokenize
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout, write_with_metadata
from nkat_gguf.texts import SHARED_LINE, builtin_text, long_lines

SMALL = 60_000  # characters: enough of every source for the checks, a fraction of the default mix


@pytest.fixture(scope="module")
def mix() -> mixed.Text:
    return mixed.mixed_text(SMALL)


def test_mix_shares_no_ten_word_run_line_or_paragraph_with_either_evaluation_text(mix: mixed.Text) -> None:
    kept = mix.content.split("\n\n")
    paragraphs = {p.strip() for p in kept if len(p.strip()) >= SHARED_LINE}
    for split in ("evaluation", "licenses"):
        evaluation = builtin_text(split).content
        runs = mixed.word_runs(evaluation)
        assert not [p for p in kept if mixed.word_runs(p) & runs], split
        assert not long_lines(mix.content) & long_lines(evaluation), split
        assert not paragraphs & {p.strip() for p in evaluation.split("\n\n")}, split


def test_mix_is_deterministic_and_says_what_it_used(mix: mixed.Text) -> None:
    again = mixed.mixed_text(SMALL)
    assert again.sha256 == mix.sha256
    assert mix.source.startswith("mix:pydoc,stdlib") and "evaluation+licenses" in mix.source
    kinds = mix.source.split(" ")[0].removeprefix("mix:").split(",")
    assert len(kinds) == (3 if mixed.MAN_DIR.is_dir() else 2)


def test_mix_never_reads_the_licence_files_or_package_docs(monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(str(self)) or original(self))
    monkeypatch.setattr(mixed, "evaluation_runs", lambda: (set(), "nothing"))  # the filter's own reads aside
    mixed.mixed_text(SMALL)
    assert read and not [p for p in read if p.startswith(("/usr/share/doc", "/usr/share/common-licenses"))]


def test_a_missing_source_is_left_out_and_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(mixed, "MAN_DIR", tmp_path / "no-man-pages")
    text = mixed.mixed_text(20_000)
    assert text.source.startswith("mix:pydoc,stdlib ") and text.source.endswith("absent: man1")


def test_roff_markup_is_stripped() -> None:
    roff = ('.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n.B ls\nlists '
            '\\fIfiles\\fR and \\(em directories.\n.PP\nSecond paragraph\\&.\n')
    assert mixed.strip_roff(roff) == "NAME ls - list directory contents\n\nDESCRIPTION ls lists files and " \
                                     "directories.\n\nSecond paragraph."


def test_self_text_is_deterministic_for_a_seed(tiny_f32: Path) -> None:
    first = sample_sequences(tiny_f32, 4, 24, seed=3, threads=1, progress=False)
    assert first == sample_sequences(tiny_f32, 4, 24, seed=3, threads=1, progress=False)
    assert first != sample_sequences(tiny_f32, 4, 24, seed=4, threads=1, progress=False)
    assert len(first) == 4 and {len(s) for s in first} == {24} and len({tuple(s) for s in first}) == 4
    text = self_text(tiny_f32, seed=3, threads=1, progress=False, sequences=4, length=24, cache=False)
    assert text.source == "self:tiny-f32.gguf,seed=3,4x24" and len(tokenize(tiny_f32, text.content)) > 40
    assert self_text(tiny_f32, seed=3, threads=1, progress=False, sequences=4, length=24).sha256 == text.sha256


def test_self_refuses_a_model_without_vocabulary(tiny_f32: Path, tmp_path: Path) -> None:
    no_vocab = tmp_path / "no-vocab.gguf"
    write_with_metadata(tiny_f32, no_vocab, {"tokenizer.ggml.model": "none"}, drop_prefixes=("tokenizer.",))
    assert read_layout(no_vocab).get("tokenizer.ggml.model") == "none"
    with pytest.raises(InputError, match="no vocabulary"):
        calibration_text("self", no_vocab, threads=1, progress=False)


def test_a_file_and_the_default_still_load(tmp_path: Path, tiny_f32: Path) -> None:
    assert calibration_text(None, tiny_f32).source == "pydoc_data.topics:calibration"
    (tmp_path / "t.txt").write_text("some text", encoding="utf-8")
    assert calibration_text(tmp_path / "t.txt", tiny_f32).content == "some text"
