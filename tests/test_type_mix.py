"""One allocation of types and θ ranks: both budgets hold, every type is one the quantizer writes as asked,
the file records what was allocated, loads in stock llama.cpp, and exports still carry γ·B·A."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from nkat_gguf.cli import main
from nkat_gguf.convert import ConvertOptions, convert
from nkat_gguf.convert.allocate import CANDIDATE_TYPES, candidate_types
from nkat_gguf.convert.selection import default_theta_tensors
from nkat_gguf.engine.llama.quantize import accepted_types, outtypes, quantize_model
from nkat_gguf.errors import InputError
from nkat_gguf.export.exports import export_kobold, export_ollama
from nkat_gguf.format import nkat
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.nkat import read_theta, type_listing_bytes
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.allocation import Choice, TypeStep, WeightSteps, allocate_mix, mix_bytes
from nkat_gguf.math.limits import DEFAULT_BYTE_BUDGET, DEFAULT_OUTTYPE, DEFAULT_THETA_RANK, DEFAULT_THETA_WEIGHTS

RNG = np.random.default_rng(11)


def steps_problem(n: int = 12) -> list[WeightSteps]:
    """Weights with 1–3 type steps (error falling, bytes rising) and θ spectra at each step."""
    out = []
    for i in range(n):
        error, size, steps = RNG.uniform(1, 10), 0, []
        for j in range(RNG.integers(1, 4)):
            energy = np.sort(RNG.uniform(0, error / 8, 6))[::-1]
            steps.append(TypeStep(f"T{j}", size, error, energy))
            error, size = error * RNG.uniform(0.2, 0.6), size + int(RNG.integers(200, 2_000))
        out.append(WeightSteps(f"blk.{i}.ffn_{'up' if i % 2 else 'down'}.weight", tuple(steps), 90, 150))
    return out


SENSITIVITY = {"ffn_up": 1.0, "ffn_down": 2.5}


@pytest.mark.parametrize("budget", [0, 700, 4_000, 15_000, 10**7])
@pytest.mark.parametrize("max_weights", [None, 0, 1, 4])
def test_mix_respects_both_budgets_and_leaves_nothing_affordable(budget: int, max_weights: int | None) -> None:
    weights = steps_problem()
    choices = allocate_mix(weights, SENSITIVITY, budget, max_weights)
    assert set(choices) == {w.name for w in weights}
    spent = mix_bytes(weights, choices)
    adapted = [n for n, c in choices.items() if c.rank > 0]
    assert spent <= budget and len(adapted) <= (len(weights) if max_weights is None else max_weights)
    left = budget - spent
    for w in weights:  # greedy is maximal: no upgrade and no θ component with a benefit still fits
        c = choices[w.name]
        at = [s.type for s in w.steps].index(c.type)
        for step in w.steps[at + 1:]:
            assert step.bytes - w.steps[at].bytes > left, (w.name, c)
        theta_blocked = max_weights == 0 or (c.rank == 0 and len(adapted) == max_weights)
        if c.rank < w.steps[at].energy.size and not theta_blocked and max_weights is None:
            assert w.component_bytes + (w.open_bytes if c.rank == 0 else 0) > left, (w.name, c)


def test_types_only_and_upgrades_keep_the_rank_fitted_to_the_new_residual() -> None:
    weights = steps_problem()
    assert all(c.rank == 0 for c in allocate_mix(weights, SENSITIVITY, 10**7, 0).values())
    unlimited = allocate_mix(weights, SENSITIVITY, 10**9)
    for w in weights:  # everything affordable: the top type and every θ component of it
        assert unlimited[w.name] == Choice(w.steps[-1].type, w.steps[-1].energy.size)


def test_the_quantizer_writes_exactly_the_types_accepted_for_each_row_width(tiny_f32: Path, tmp_path: Path) -> None:
    """Every candidate type asked for every weight of the tiny model (rows 64 and 128 wide): the file holds the
    type asked where accepted_types allows it, and something else (llama.cpp's fallback) everywhere else."""
    layout = read_layout(tiny_f32)
    names = default_theta_tensors(layout)
    widths = {t.name: t.shape[0] for t in layout.tensors}
    for ggml_type in CANDIDATE_TYPES:
        out = tmp_path / f"{ggml_type.name}.gguf"
        quantize_model(tiny_f32, out, outtypes()["IQ4_NL"], None, 2, {n: ggml_type for n in names})
        written = {t.name: t.type for t in read_layout(out).tensors}
        for n in names:
            assert (written[n] == ggml_type) == bool(accepted_types(widths[n], (ggml_type,))), (ggml_type, n)
    T = GGMLQuantizationType
    assert T.Q6_K not in candidate_types(T.IQ4_NL, 576)  # SmolLM2's rows
    # same bits as the base (Q4_K, Q4_0) and fewer (IQ4_XS, Q3_K) are candidates where the rows fit them
    assert {T.Q4_K, T.Q4_0, T.IQ4_XS, T.Q3_K, T.Q6_K} <= set(candidate_types(T.IQ4_NL, 1536))
    assert T.Q4_0 in candidate_types(T.IQ4_NL, 576) and T.IQ4_NL not in candidate_types(T.IQ4_NL, 1536)
    assert candidate_types(T.Q8_0, 1536)[-1] == T.Q6_K  # every type is a candidate, Q8_0 too as a base
    # the input's own type (re-quantizing to it is a copy) is a candidate: on a Q2_K input, Q2_K
    assert T.Q2_K in candidate_types(T.IQ4_NL, 1536, T.Q2_K) and T.Q2_K not in candidate_types(T.IQ4_NL, 1536)
    assert T.F16 not in candidate_types(T.IQ4_NL, 1536, T.F16)


@pytest.fixture(scope="module")
def mixed(tiny_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("mix")
    common = dict(input=tiny_f32, outtype="IQ4_NL", threads=2, progress=False)
    base = d / "base.gguf"
    convert(ConvertOptions(output=base, theta_rank=0, **common))
    files = {"base": (base, None)}
    for label, options in (("types", dict(theta_weights=0, byte_budget="6%")),  # 0: θ on no weight, types only
                           ("theta", dict(byte_budget="6%", theta_weights=3))):
        out = d / f"{label}.gguf"
        files[label] = (out, convert(ConvertOptions(output=out, **options, **common)))
    return files


@pytest.mark.parametrize("label", ["types", "theta"])
def test_mixed_file_records_its_allocation_within_both_budgets(mixed: dict, label: str) -> None:
    base_path, _ = mixed["base"]
    path, report = mixed[label]
    allocation, base, layout = report.allocation, read_layout(base_path), read_layout(path)
    # 6 % of the base type's file as llama.cpp wrote it: the base output less its nkat provenance (< 4 KiB)
    assert 0.06 * (base_path.stat().st_size - 4096) <= allocation["budget_bytes"] <= 0.06 * base_path.stat().st_size
    base_types = {t.name: t.type.name for t in base.tensors}
    types = {t.name: t.type.name for t in layout.tensors}
    upgrades = json.loads(layout.get(nkat.ALLOCATION_TYPES))
    assert upgrades == report.types == {n: t for n, t in types.items() if t != base_types[n]}
    assert upgrades and all(GGML_QUANT_SIZES[GGMLQuantizationType[t]][0] <= 32 for t in upgrades.values())
    # the tensor data grew by exactly the padded bytes the allocator counted for the types
    data_growth = (layout.file_size - layout.data_offset) - (base.file_size - base.data_offset)
    theta = read_theta(path)
    theta_bytes = sum(nkat.listing_bytes(n) + t.rank * nkat.component_bytes(t.b.shape[0], t.a.shape[1])
                      for n, t in theta.tensors.items())
    listing = sum(type_listing_bytes(n, t) for n, t in upgrades.items())
    assert data_growth + listing + theta_bytes == allocation["spent_bytes"] <= allocation["budget_bytes"]
    assert layout.get(nkat.ALLOCATION_METHOD) == "mix"
    assert layout.get(nkat.ALLOCATION_OP_BUDGET) == (0 if label == "types" else 3)
    assert len(theta.tensors) == allocation["weights"] <= (0 if label == "types" else 3)
    assert theta.ranks == {n: t["rank"] for n, t in report.tensors.items()}
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)  # stock llama.cpp loads the mixed file
    assert llm.n_vocab() > 0
    llm.close()


def test_upgraded_weights_with_theta_are_fitted_to_their_new_residual(mixed: dict) -> None:
    path, report = mixed["theta"]
    theta, source = read_theta(path), TensorSource(path)
    assert theta.tensors, "the tiny model's allocation adapted no weight"
    for name, t in theta.tensors.items():
        assert t.b.shape[0] == source.numpy_shape(name)[0] and t.a.shape[1] == source.numpy_shape(name)[1]
    assert report.allocation["sensitivity"].keys() >= {"attn_q", "ffn_down"}


def test_exports_of_a_mixed_file_apply_gamma_b_a(mixed: dict, tmp_path: Path) -> None:
    path, _ = mixed["theta"]
    theta = read_theta(path)
    ollama = export_ollama(path, tmp_path / "ollama", gamma=0.5, name="mixed")
    kobold = export_kobold(path, tmp_path / "kobold", gamma=0.5, threads=2)
    model = TensorSource(Path(ollama.files["model"]))
    assert {t.name: t.type for t in model.layout.tensors} == {t.name: t.type for t in read_layout(path).tensors}
    for adapter in (Path(ollama.files["adapter"]), Path(json.loads(Path(kobold.files["kcpps"]).read_text())["lora"][0])):
        lora = TensorSource(adapter)
        assert lora.layout.get("adapter.lora.alpha") == 0.0
        for name, t in theta.tensors.items():
            f = t.dequantize()
            np.testing.assert_array_equal(lora.dequantize(name + ".lora_b"), (0.5 * f.b).astype(np.float16))
            np.testing.assert_array_equal(lora.dequantize(name + ".lora_a"), f.a.astype(np.float16))


@pytest.mark.parametrize(("options", "message"), [
    (dict(byte_budget="-3%"), "--byte-budget '-3%' is negative"),
    (dict(byte_budget="lots"), "--byte-budget 'lots' is not a size"),
    (dict(byte_budget="3"), "is not a size"),
    (dict(byte_budget="150%"), "over 100 %"),
    (dict(byte_budget="9000MiB"), "larger than the model"),
    (dict(byte_budget="0%"), "allows nothing"),
    (dict(byte_budget="3%", theta_weights=-1), "--theta-weights -1 is out of range"),
    (dict(byte_budget="3%", theta_weights=10_000), "--theta-weights 10000 is out of range"),
    (dict(byte_budget="3%", theta_weights="many"), "--theta-weights must be a whole number"),
    (dict(theta_rank=4, theta_weights=3), "--theta-weights 3 caps a budget's allocation"),
    (dict(byte_budget="3%", theta_budget="1%"), "cannot be combined with --theta-budget"),
    (dict(byte_budget="3%", theta_rank=0, theta_weights=2), "--theta-rank 0 asks for none"),
    (dict(theta_budget="1%", theta_weights=0), "--theta-weights 0 allows it on no weight"),
    (dict(tensor_types=(("blk.*.attn_v.weight", "Q6_K"),)), "cannot hold"),
    (dict(tensor_types=(("blk.*.attn_v.weight", "Q9_9"),)), "unknown type"),
])
def test_bad_budgets_are_one_clear_line(tiny_f32: Path, tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")) as caught:
        convert(ConvertOptions(input=tiny_f32, output=tmp_path / "x.gguf", progress=False, **options))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("label", ["types", "theta"])
def test_mixed_report_is_json_with_no_unmeasured_figure_as_nan(mixed: dict, label: str) -> None:
    """`convert --json` refuses non-finite figures: what an allocation does not measure is null, not NaN."""
    report = mixed[label][1].as_dict()
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_the_library_default_is_the_command_default(tiny_f32: Path, tmp_path: Path) -> None:
    """`ConvertOptions(input, output)` and `nkat-gguf convert` with no options: the same settings, the same bytes.
    The default is the allocation under DEFAULT_BYTE_BUDGET with θ on at most DEFAULT_THETA_WEIGHTS weights (the
    tiny model has fewer: all of them may carry θ, not a refusal); a uniform rank only when one is asked for."""
    library = ConvertOptions(input=tiny_f32, output=tmp_path / "library.gguf")
    resolved = library.resolved()
    assert (resolved.outtype, resolved.byte_budget, resolved.theta_rank, resolved.theta_weights) == (
        DEFAULT_OUTTYPE, DEFAULT_BYTE_BUDGET, DEFAULT_THETA_RANK, None)
    assert ConvertOptions(input=tiny_f32, output=tmp_path / "u.gguf", theta_rank=4).resolved().byte_budget is None
    assert ConvertOptions(input=tiny_f32, output=tmp_path / "t.gguf", theta_budget="1%").resolved().byte_budget is None
    report = convert(replace(library, progress=False)).as_dict()
    cli = CliRunner().invoke(main, ["convert", "--input", str(tiny_f32), "-o", str(tmp_path / "cli.gguf"), "--json"])
    assert cli.exit_code == 0, cli.output
    by_cli = json.loads(cli.stdout)
    n_weights = len(default_theta_tensors(read_layout(tiny_f32)))
    assert report["allocation"]["method"] == "mix"
    assert report["allocation"]["max_weights"] == min(DEFAULT_THETA_WEIGHTS, n_weights)
    assert report["allocation"]["budget_bytes"] <= float(DEFAULT_BYTE_BUDGET[:-1]) / 100 * (
        tmp_path / "library.gguf").stat().st_size
    for key in ("outtype", "theta_rank", "gamma", "imatrix", "allocation", "types", "tensors"):
        assert by_cli[key] == report[key], key
    assert (tmp_path / "cli.gguf").read_bytes() == (tmp_path / "library.gguf").read_bytes()


@pytest.mark.parametrize("outtype", ["F32", "f16"])
def test_an_unquantized_outtype_writes_every_weight_at_it_with_no_theta(tiny_f32: Path, tmp_path: Path,
                                                                        outtype: str) -> None:
    """`convert --outtype F32 --so8t random` is how the off-grid reference is made: nothing is lost, so the default
    allocates nothing and fits no θ (the allocation's mixed file had llama.cpp refuse every pinned type)."""
    assert ConvertOptions(input=tiny_f32, output=tmp_path / "x.gguf", outtype=outtype).resolved().byte_budget is None
    out = tmp_path / "full.gguf"
    cli = CliRunner().invoke(main, ["convert", "--input", str(tiny_f32), "-o", str(out), "--outtype", outtype,
                                    "--json"])
    assert cli.exit_code == 0, cli.output
    weights = [t for t in read_layout(out).tensors if t.name.startswith("blk.") and t.name.endswith("_v.weight")]
    assert weights and all(t.type.name == outtype.upper() for t in weights)
    assert not nkat.read_theta(out).tensors
