"""The quality table on a tiny random model: its rows, their provenance, one calibration, and the CLI shell.

The tiny model's perplexities mean nothing; what is checked is that each row is the file it claims
to be. No timing assertions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import nkat_gguf.evaluate.quality as quality_module
from nkat_gguf.cli import main
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.evaluate.quality import QualitySettings, format_quality_table, quality_table
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.math.limits import DEFAULT_OUTTYPE
from nkat_gguf.texts import builtin_text

SETTINGS = QualitySettings(theta_rank=4, n_ctx=64, n_chunks=2, repetitions=1, n_prompt=64, n_gen=8, progress=False)
ROWS = ["reference", "plain", "imatrix", "theta", "imatrix+theta"]


@pytest.fixture(scope="module")
def table(tiny_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out_dir = tmp_path_factory.mktemp("quality")

    def no_second_calibration(*args: object, **kwargs: object) -> None:
        raise AssertionError("convert calibrated again: the table must reuse its one calibration")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("nkat_gguf.convert.pipeline.calibrate", no_second_calibration)
        result = quality_table(tiny_f32, builtin_text("evaluation"), RuntimeOptions(n_ctx=64, n_batch=64, n_threads=2),
                               SETTINGS, out_dir=out_dir)
    return result, out_dir


def test_rows_are_the_files_they_claim_to_be(table: tuple[dict, Path]) -> None:
    result, out_dir = table
    rows = result["variants"]
    assert list(rows) == ROWS
    assert [rows[n]["imatrix"] for n in ROWS] == [None, "none", "calibration", "none", "calibration"]
    assert [rows[n]["theta"] for n in ROWS] == [False, False, False, True, True]
    assert rows["theta"]["gamma"] == rows["imatrix+theta"]["gamma"] == pytest.approx(SETTINGS.gamma)
    for name in ROWS[1:]:
        theta_rank = read_layout(out_dir / rows[name]["file"]).get("nkat.theta.rank")
        assert theta_rank == (SETTINGS.theta_rank if rows[name]["theta"] else 0), name
    size = {n: rows[n]["file_bytes"] for n in ROWS}
    assert size["theta"] > size["plain"] and size["imatrix+theta"] > size["imatrix"]
    # same tensor types: with an imatrix llama.cpp makes the first n_layer/8 ffn_down Q4_1, none of 2 layers
    assert abs(size["imatrix"] - size["plain"]) < 1024


def test_one_calibration_is_recorded_where_it_was_used(table: tuple[dict, Path]) -> None:
    result, out_dir = table
    calibration = result["calibration"]
    assert calibration["tokens"] > 0 and calibration["source"] == "pydoc_data.topics:calibration"
    for name in ("imatrix", "theta", "imatrix+theta"):
        layout = read_layout(out_dir / result["variants"][name]["file"])
        assert layout.get("nkat.calibration.sha256") == calibration["sha256"], name
        assert layout.get("nkat.calibration.tokens") == calibration["tokens"], name
    assert read_layout(out_dir / result["variants"]["plain"]["file"]).get("nkat.calibration.sha256") is None


def test_gap_shares_and_output(table: tuple[dict, Path]) -> None:
    result, _ = table
    rows = result["variants"]
    if rows["plain"]["ppl"] > rows["reference"]["ppl"]:
        assert rows["reference"]["gap_recovered"] == pytest.approx(1.0)
        assert rows["plain"]["gap_recovered"] == 0.0
    else:
        assert all(r["gap_recovered"] is None for r in rows.values())
    assert rows["plain"]["tg_vs_plain"] == 1.0
    for r in rows.values():
        assert r["ppl"] > 0 and r["pp_tokens_per_second"] > 0 and r["tg_tokens_per_second"] > 0
        assert r["chunks"] == SETTINGS.n_chunks
    assert json.loads(json.dumps(result)) == result
    text = format_quality_table(result)
    assert all(any(line.startswith(name + " ") for line in text.splitlines()) for name in ROWS)


def test_cli_is_a_thin_shell(table: tuple[dict, Path], tiny_f32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(*args: object, **kwargs: object) -> dict:
        calls.append(args)
        return dict(table[0])

    monkeypatch.setattr(quality_module, "quality_table", fake)
    run = CliRunner().invoke(main, ["quality", "--input", str(tiny_f32), "--theta-rank", "4", "--ctx", "64",
                                    "--chunks", "3", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["variants"].keys() == table[0]["variants"].keys()
    model, text, runtime_options, settings, reference, calib_text, out_dir = calls[0]
    assert (model, reference, calib_text, out_dir) == (tiny_f32, None, None, None)
    assert (settings.theta_rank, settings.n_ctx, settings.n_chunks, settings.outtype) == (4, 64, 3, DEFAULT_OUTTYPE)
    assert runtime_options.n_ctx >= settings.n_prompt  # the speed runs need room for pp512
