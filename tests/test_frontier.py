"""The frontier run: its rows are the files they claim, one calibration feeds them, the envelope and plot hold.

The tiny random model's perplexities mean nothing; what is checked is each row against its file on
disk, the quantizer's fallbacks as read from the files, and the one-line refusals of bad input.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

import nkat_gguf.evaluate.frontier as engine_frontier
from nkat_gguf.cli import main
from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.evaluate.compare import CompareSettings
from nkat_gguf.evaluate.frontier import (
    FrontierSettings,
    ThetaSpec,
    format_frontier,
    format_markdown,
    frontier,
    lower_envelope,
    parse_mix_spec,
    parse_theta_spec,
)
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.format.kld_base import BaseFile

MEASURE = CompareSettings(n_ctx=64, n_chunks=1, repetitions=1, n_prompt=64, n_gen=8, progress=False)
SETTINGS = FrontierSettings(types=("Q4_0", "Q3_K_M"),
                            thetas=(parse_theta_spec("Q4_0:4"), parse_theta_spec("Q4_0:4:ffn"),
                                    parse_theta_spec("Q4_0:auto")),
                            mixes=(parse_mix_spec("Q4_0:blk.*.attn_v.weight=Q8_0"),
                                   parse_mix_spec("Q4_0:byte_budget=5%")),
                            measure=MEASURE, threads=2, progress=False)
NAMES = ["reference", "Q4_0 plain", "Q4_0+imatrix", "Q3_K_M+imatrix", "Q4_0+imatrix+tensor-type attn_v=Q8_0",
         "Q4_0+imatrix+allocator byte_budget=5%", "Q4_0+imatrix+θ r4", "Q4_0+imatrix+θ r4 ffn",
         "Q4_0+imatrix+θ allocated"]


@pytest.fixture(scope="module")
def run(tiny_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out_dir = tmp_path_factory.mktemp("frontier") / "files"  # created by the run

    def no_second_calibration(*args: object, **kwargs: object) -> None:
        raise AssertionError("convert calibrated again: every file must share the run's one calibration")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("nkat_gguf.convert.pipeline.calibrate", no_second_calibration)
        result = frontier(tiny_f32, RuntimeOptions(n_ctx=64, n_batch=64, n_threads=2), SETTINGS,
                          out_dir=out_dir, plot=out_dir.parent / "frontier.png")
    return result, out_dir


def test_rows_are_the_files_they_claim(run: tuple[dict, Path], tiny_f32: Path) -> None:
    result, out_dir = run
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == NAMES
    for name, row in rows.items():
        path = Path(row["path"])
        assert path == (tiny_f32 if name == "reference" else out_dir / row["file"]), name
        assert row["file_bytes"] == path.stat().st_size, name
        assert row["sha256"] == sha256_file(path), name
        assert row["tensor_types"] == dict(Counter(t.type.name for t in read_layout(path).tensors)), name
    assert len({r["sha256"] for r in rows.values()}) == len(rows)  # no row measured another row's file
    assert [rows[n]["imatrix"] for n in NAMES] == [None, "none"] + ["calibration"] * (len(NAMES) - 2)
    for name in NAMES[1:]:
        layout = read_layout(out_dir / rows[name]["file"])
        if rows[name]["theta"] and rows[name]["theta"]["rank"] is None:  # convert's default: types and ranks allocated
            assert layout.get("nkat.allocation.method") == "mix" and rows[name]["kind"] == "nkat", name
            continue
        assert layout.get("nkat.theta.rank") == (4 if rows[name]["kind"] == "nkat" else 0), name


def test_per_tensor_mixes_are_the_types_they_name(run: tuple[dict, Path]) -> None:
    rows = {r["name"]: r for r in run[0]["rows"]}
    hand, allocator = rows[NAMES[4]], rows[NAMES[5]]
    assert hand["kind"] == allocator["kind"] == "mix" and hand["base"] == "Q4_0+imatrix"
    types = {t.name: t.type.name for t in read_layout(Path(hand["path"])).tensors}
    assert {t for n, t in types.items() if ".attn_v." in n} == {"Q8_0"}
    assert hand["tensor_types"]["Q8_0"] > rows["Q4_0+imatrix"]["tensor_types"].get("Q8_0", 0)
    assert rows["Q4_0+imatrix"]["file_bytes"] < allocator["file_bytes"] <= 1.05 * rows["Q4_0+imatrix"]["file_bytes"]


def test_fallbacks_are_reported_from_the_quantizer_and_visible_in_the_file(run: tuple[dict, Path]) -> None:
    rows = {r["name"]: r for r in run[0]["rows"]}
    q3 = rows["Q3_K_M+imatrix"]
    # the tiny model's rows are 64 or 128 wide: no K-quant block of 256 fits, so no Q3_K tensor is written
    assert "Q3_K" not in q3["tensor_types"] and q3["fallbacks"].get("q3_K -> q4_0", 0) > 0
    assert set(rows["Q4_0+imatrix"]["tensor_types"]) <= {"Q4_0", "Q4_1", "Q8_0", "F32"}


def test_theta_variants_carry_theta_where_asked(run: tuple[dict, Path]) -> None:
    rows = {r["name"]: r for r in run[0]["rows"]}
    every, ffn = rows["Q4_0+imatrix+θ r4"], rows["Q4_0+imatrix+θ r4 ffn"]
    assert (every["theta"]["adapted_weights"], ffn["theta"]["adapted_weights"]) == (14, 6)  # 2 layers × 7, × 3
    assert every["base"] == ffn["base"] == "Q4_0+imatrix"
    assert every["file_bytes"] > ffn["file_bytes"] > rows["Q4_0+imatrix"]["file_bytes"]
    assert every["speed_vs_base"]["tg"] > 0 and rows["Q4_0+imatrix"]["speed_vs_base"] is None
    off = every["speed_theta_vs_off"]["tg"]  # the same file with θ off, timed beside it every round
    assert off["ci95"][0] <= off["ratio"] <= off["ci95"][1] and off["rounds"] >= 2
    assert rows["Q4_0+imatrix"]["speed_theta_vs_off"] is None


def test_gaps_envelope_and_outputs(run: tuple[dict, Path]) -> None:
    result, out_dir = run
    rows = {r["name"]: r for r in result["rows"]}
    for key in ("evaluation", "licenses"):
        plain, ref = rows["Q4_0 plain"]["perplexity"][key]["ppl"], rows["reference"]["perplexity"][key]["ppl"]
        if plain > ref:
            assert rows["Q4_0 plain"]["gap_recovered"][key] == 0.0
            assert rows["reference"]["gap_recovered"][key] == pytest.approx(1.0)
        assert result["frontier"][key] == [r["name"] for r in lower_envelope(result["rows"], key)]
        for row in rows.values():
            assert row["perplexity"][key]["chunks"] == 1
        for name in NAMES[6:]:
            verdict = rows[name]["frontier"][key]
            assert verdict["beats"] == (verdict["best_ppl"] is None
                                        or rows[name]["perplexity"][key]["ppl"] < verdict["best_ppl"])
    assert result["texts"]["evaluation"]["source"] == "pydoc_data.topics:evaluation"
    assert result["texts"]["licenses"]["source"].startswith("licenses:")
    assert result["calibration"]["source"] == "pydoc_data.topics:calibration"
    assert json.loads(json.dumps(result)) == result
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(any(line.startswith(name + " ") for line in format_frontier(result).splitlines()) for name in NAMES)
    table = format_markdown(result).splitlines()
    assert len(table) == 4 + len(NAMES) and all(any(f"| {name} |" in line for line in table) for name in NAMES)


def test_kld_beside_perplexity_against_one_reference_pass_per_text(run: tuple[dict, Path]) -> None:
    result, out_dir = run
    rows = {r["name"]: r for r in result["rows"]}
    for key in ("evaluation", "licenses"):
        with BaseFile(Path(result["kld_base_files"][key])) as base:  # kept in the out dir, read by the next run
            assert Path(result["kld_base_files"][key]).parent == out_dir
            assert (base.header.n_ctx, base.header.n_chunk) == (64, 1)
        assert rows["reference"]["kld"][key] is None
        for name in NAMES[1:]:
            kld = rows[name]["kld"][key]
            assert kld["tokens"] == 31 and kld["kld"] > 0 and kld["kld_ci95"][0] <= kld["kld"] <= kld["kld_ci95"][1]
            assert kld["ppl_base"] == pytest.approx(rows["reference"]["perplexity"][key]["ppl"], rel=1e-3)
            assert kld["ppl"] == pytest.approx(rows[name]["perplexity"][key]["ppl"], rel=1e-4)
    assert result["default_candidate"] == engine_frontier.default_candidate(result["rows"])
    assert result["default_candidate_by_gap"] == engine_frontier.default_candidate(result["rows"], by="gap")
    assert "KLD" in format_markdown(result) and "KLD" in format_frontier(result)


def _row(name: str, mib: float, ppl: float, kind: str = "imatrix") -> dict:
    return {"name": name, "kind": kind, "file_bytes": int(mib * (1 << 20)), "perplexity": {"t": {"ppl": ppl}}}


def test_lower_envelope_keeps_only_types_no_smaller_type_beats() -> None:
    rows = [_row("a", 84, 30), _row("b", 87, 25), _row("c", 88, 26), _row("d", 89, 22), _row("e", 89, 21),
            _row("p", 80, 10, kind="plain")]
    assert [r["name"] for r in lower_envelope(rows, "t")] == ["a", "b", "e"]
    envelope = lower_envelope(rows, "t")
    assert engine_frontier._against_frontier(_row("n", 88.5, 24.9, "nkat"), envelope, "t") == {
        "best_type": "b", "best_ppl": 25, "beats": True}
    equal_size = engine_frontier._against_frontier(_row("n", 89, 21.5, "nkat"), envelope, "t")
    assert equal_size["best_type"] == "e" and not equal_size["beats"]  # equal size counts against it


def test_default_candidate_fits_the_budget_beats_the_frontier_and_is_best_on_its_worse_text() -> None:
    def nkat_row(name: str, mib: float, gaps: tuple[float, float], beats: tuple[bool, bool],
                 klds: tuple[float, float]) -> dict:
        return {"name": name, "kind": "nkat", "base": "b", "file_bytes": int(mib * (1 << 20)),
                "gap_recovered": dict(zip("xy", gaps)), "frontier": {k: {"beats": v} for k, v in zip("xy", beats)},
                "kld": {k: {"kld": v} for k, v in zip("xy", klds)}}

    base = {"name": "b", "kind": "imatrix", "file_bytes": 100 << 20}
    rows = [base, nkat_row("big", 103.5, (0.99, 0.99), (True, True), (0.01, 0.01)),
            nkat_row("loses", 101, (0.9, 0.9), (True, False), (0.01, 0.01)),
            nkat_row("even", 102, (0.7, 0.7), (True, True), (0.05, 0.05)),
            nkat_row("lopsided", 102.9, (0.95, 0.6), (True, True), (0.02, 0.06)),
            nkat_row("low-kld", 102.5, (0.6, 0.6), (True, True), (0.04, 0.045))]
    # by KLD: the lowest worse-text mean KLD ("lopsided" is best on one text, worst on the other)
    assert engine_frontier.default_candidate(rows) == "low-kld"
    assert engine_frontier.default_candidate(rows, budget=0.04) == "big"
    assert engine_frontier.default_candidate(rows[:3]) is None
    # by the gap share on the worse text, the criterion before KLD
    assert engine_frontier.default_candidate(rows, by="gap") == "even"
    assert engine_frontier.default_candidate(rows, budget=0.04, by="gap") == "big"


def test_theta_spec_parsing() -> None:
    assert parse_theta_spec("iq4_nl:8") == ThetaSpec("IQ4_NL", 8)
    spec = parse_theta_spec("Q4_0:16:blk.*.ffn_down,blk.*.ffn_up:theta-gamma=1")
    assert spec.patterns == ["blk.*.ffn_down", "blk.*.ffn_up"] and spec.options == (("gamma", 1),)  # the old key
    assert parse_theta_spec("Q4_0:16:blk.*.ffn_down,blk.*.ffn_up:gamma=1") == spec
    assert parse_theta_spec("Q4_0:4:ffn").patterns == ["blk.*.ffn_*"]
    assert parse_theta_spec("IQ4_NL:auto") == ThetaSpec("IQ4_NL", None)  # the ranks left to convert's allocation
    for old in ("op_budget", "theta_max_weights", "theta-weights"):  # old spellings: the one option
        assert parse_theta_spec(f"IQ4_NL:8:byte_budget=3%:{old}=0").options == (("byte_budget", "3%"),
                                                                                ("theta_weights", 0))
    for bad in ("Q4_0", "Q4_0:0", "Q4_0:x", "Q4_0:4:ffn:attn", "Q4_0:4:output=x.gguf"):
        with pytest.raises(InputError):
            parse_theta_spec(bad)


@pytest.mark.parametrize("args, message", [
    (["--types", "Q4_0,Q9_X"], "unknown --outtype 'Q9_X'"),
    (["--chunks", "0"], "--chunks must be at least 1"),
    (["--theta", "Q4_0:0"], "RANK an integer >= 1"),
    (["--theta", "Q4_0:4:blk.*.nothing"], "matches no attention/FFN weight"),
    (["--out-dir", "{file}/sub"], "cannot create output directory"),
    (["--plot", "{file}/sub/plot.png"], "output directory does not exist"),
    (["--reference", "{missing}"], "no such file"),
])
def test_bad_input_is_one_line(tiny_f32: Path, tmp_path: Path, args: list[str], message: str) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    args = [a.format(file=a_file, missing=tmp_path / "missing.gguf") for a in args]
    run = CliRunner().invoke(main, ["frontier", "--input", str(tiny_f32), *args])
    assert run.exit_code != 0
    lines = [line for line in run.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], run.output
    assert not (tmp_path / "a-file").is_dir()


def test_cli_is_a_thin_shell(run: tuple[dict, Path], tiny_f32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(*args: object) -> dict:
        calls.append(args)
        return dict(run[0])

    monkeypatch.setattr(engine_frontier, "frontier", fake)
    result = CliRunner().invoke(main, ["frontier", "--input", str(tiny_f32), "--types", "q4_0,IQ4_NL", "--types",
                                       "Q5_0", "--theta", "none", "--chunks", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads(result.output)["rows"]] == NAMES
    model, runtime_options, settings, reference, calib_text, out_dir, plot = calls[0]
    assert (model, reference, calib_text, out_dir, plot) == (tiny_f32, None, None, None, None)
    assert settings.types == ("Q4_0", "IQ4_NL", "Q5_0") and settings.thetas == ()
    assert settings.measure.n_chunks == 3 and runtime_options.n_ctx >= settings.measure.n_prompt


@pytest.mark.slow
def test_default_model_rows_match_their_files(tmp_path: Path) -> None:
    settings = FrontierSettings(types=("Q4_0", "IQ4_NL"),
                                thetas=(parse_theta_spec("IQ4_NL:2:blk.*.ffn_down.weight"),), mixes=(),
                                measure=CompareSettings(n_chunks=1, repetitions=1, n_prompt=64, n_gen=8,
                                                        progress=False), threads=2, progress=False)
    result = frontier(default_model_path(), RuntimeOptions(n_threads=2), settings, out_dir=tmp_path)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["reference", "Q4_0 plain", "Q4_0+imatrix", "IQ4_NL+imatrix",
                          "IQ4_NL+imatrix+θ r2 blk.*.ffn_down.weight"]
    for row in rows.values():
        path = Path(row["path"])
        assert row["file_bytes"] == path.stat().st_size and row["sha256"] == sha256_file(path)
    assert rows["IQ4_NL+imatrix+θ r2 blk.*.ffn_down.weight"]["theta"]["adapted_weights"] == 30
    assert "IQ4_NL" in rows["IQ4_NL+imatrix"]["tensor_types"]
    for key in ("evaluation", "licenses"):  # real text on a real model: the gap exists and the reference closes it
        assert rows["Q4_0 plain"]["perplexity"][key]["ppl"] > rows["reference"]["perplexity"][key]["ppl"]


def test_help_lists_the_defaults_the_run_uses() -> None:
    from nkat_gguf.evaluate.frontier import DEFAULT_THETA, DEFAULT_TYPES
    from nkat_gguf.math.limits import DEFAULT_OUTTYPE

    text = " ".join(CliRunner().invoke(main, ["frontier", "--help"]).output.split())
    assert " ".join(DEFAULT_TYPES) in text and " ".join(DEFAULT_THETA) in text
    assert f"{DEFAULT_OUTTYPE}:auto" in DEFAULT_THETA  # convert's own default is among the default variants


def test_convert_help_states_the_defaults_convert_uses() -> None:
    from nkat_gguf.math.limits import DEFAULT_BYTE_BUDGET, DEFAULT_OUTTYPE, DEFAULT_THETA_WEIGHTS

    text = " ".join(CliRunner().invoke(main, ["convert", "--help"]).output.split())
    assert f"--outtype {DEFAULT_OUTTYPE} --byte-budget {DEFAULT_BYTE_BUDGET} --theta-weights {DEFAULT_THETA_WEIGHTS}" in text