"""The built-in texts: the calibration split shares no prose with either evaluation text."""

from __future__ import annotations

from nkat_gguf.texts import SHARED_LINE, builtin_text, long_lines


def _paragraphs(text: str) -> set[str]:
    return {p.strip() for p in text.split("\n\n") if len(p.strip()) >= SHARED_LINE}


def test_calibration_shares_no_line_or_paragraph_with_either_evaluation_text() -> None:
    calibration = builtin_text("calibration").content
    for split in ("evaluation", "licenses"):
        evaluation = builtin_text(split).content
        assert not long_lines(calibration) & long_lines(evaluation), split
        assert not _paragraphs(calibration) & _paragraphs(evaluation), split


def test_evaluation_split_keeps_most_of_its_topics() -> None:
    # pydoc topics repeat each other's sections; dropping those from the evaluation split must leave most of it
    from pydoc_data.topics import topics

    kept = len(builtin_text("evaluation").content)
    everything = sum(len(t) for t in topics.values())
    assert kept > 0.6 * everything
    assert len(long_lines("\n".join(topics.values()))) > len(long_lines(builtin_text("evaluation").content))
