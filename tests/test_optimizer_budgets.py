"""nkat-gguf optimize searching convert's budgets: θ budgets cut from the base, byte budgets as convert writes them,
the θ-weight count; the study's records and the file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.convert import ConvertOptions
from nkat_gguf.convert.allocate import reallocate, stored_costs
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.nkat import NkatTheta, read_theta
from nkat_gguf.math.allocation import allocation_bytes
from nkat_gguf.math.lowrank import residual_spectrum, theta_from_residual
from nkat_gguf.math.theta import quantize_int8
from nkat_gguf.optimizer.base_model import SENSITIVITY_ATTR, theta_for
from nkat_gguf.optimizer.options import OptimizeOptions, ThetaConfig
from nkat_gguf.optimizer.study import optimize

RNG = np.random.default_rng(2)


def test_stored_components_carry_the_spectrum_and_reallocation_keeps_both_budgets() -> None:
    shapes = {f"blk.{i}.{k}.weight": s for i in range(3) for k, s in (("attn_q", (48, 48)), ("ffn_down", (48, 96)))}
    residuals = {n: RNG.standard_normal(s).astype(np.float32) * RNG.uniform(0.2, 2.0) for n, s in shapes.items()}
    theta = NkatTheta(0.9, {n: quantize_int8(theta_from_residual(e, 6).factors) for n, e in residuals.items()})
    for cost in stored_costs(theta, 6):  # ‖B_k‖² is σ_k², up to INT8 rounding
        np.testing.assert_allclose(cost.energy, residual_spectrum(residuals[cost.name])[:6], rtol=0.05)
    sensitivity = {"attn_q": 1.0, "ffn_down": 3.0}
    for budget, max_weights, cap in ((3_000, None, 6), (3_000, 2, 6), (10**9, None, 4), (10**9, 1, 6)):
        cut = reallocate(theta, sensitivity, budget, max_weights, cap, 0.5)
        assert cut.gamma == 0.5 and all(1 <= r <= cap for r in cut.ranks.values())
        assert allocation_bytes(stored_costs(theta, cap), cut.ranks) <= budget
        assert len(cut.tensors) <= (max_weights or len(shapes))
        for name, t in cut.tensors.items():
            assert np.array_equal(t.a, theta.tensors[name].a[:t.rank])  # the stored components, cut


@pytest.fixture(scope="module")
def budget_search(tiny_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[OptimizeOptions, dict]:
    out = tmp_path_factory.mktemp("budgets") / "out"
    opts = OptimizeOptions(
        convert=ConvertOptions(input=tiny_f32, output=out, outtype="Q4_0", threads=2, progress=False),
        output_dir=out, mode="custom", trials=8, ranks=(2, 4), theta_budgets=("0.2%", "1%"), theta_weights=(3, 6),
        n_ctx=64, chunks=1, eval_chunks=1, speed_repetitions=1, n_gen=16,
        runtime=RuntimeOptions(n_ctx=512, n_threads=2), progress=False)
    return opts, optimize(opts)


def test_budget_search_records_and_writes_what_it_applied(budget_search: tuple[OptimizeOptions, dict]) -> None:
    import optuna

    opts, summary = budget_search
    space = summary["search_space"]
    assert space["theta_budget"] == ["none", "0.2%", "1%"] and space["theta_weights"] == [3, 6]
    study = optuna.load_study(study_name=opts.study_name, storage=summary["storage"])
    sensitivity = study.user_attrs[SENSITIVITY_ATTR]
    assert set(sensitivity) == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    assert all(v >= 0 for v in sensitivity.values())
    budgeted = [t for t in study.trials if t.params.get("theta_budget", "none") != "none"]
    assert budgeted, "the sampler never tried a budget"
    for t in budgeted:
        config = ThetaConfig.from_params(t.params)
        assert f"generation_speed:{config.key}" in study.user_attrs
        assert "theta_weights" in t.params
    best = summary["best"]["params"]
    model = Path(summary["files"]["model"])
    stored, base = read_theta(model), next((opts.output_dir / "work").glob("theta_rank4-*.nkat.gguf"))
    if best["rank"]:
        expected = theta_for(base, read_theta(base), ThetaConfig.from_params(best), best["gamma"], sensitivity)
        assert stored.ranks == expected.ranks and stored.gamma == pytest.approx(best["gamma"])
    else:
        assert stored.tensors == {}


def test_budget_options_are_checked(tiny_f32: Path, tmp_path: Path) -> None:
    opts = OptimizeOptions(convert=ConvertOptions(input=tiny_f32, output=tmp_path, outtype="Q4_0", progress=False),
                           output_dir=tmp_path / "out", progress=False)
    for changes, message in (({"theta_weights": (3,)}, "--theta-weights needs --byte-budget or --theta-budget"),
                             ({"theta_budgets": ("1%",), "theta_weights": (-1,)}, "--theta-weights must be >= 0"),
                             ({"theta_budgets": ("-1%",)}, "negative"),
                             ({"byte_budgets": ("0%",)}, "--byte-budget 0 allows nothing"),
                             ({"outtypes": ("Q4_0", "Q9_9")}, "unknown --outtype"),
                             ({"theta_budgets": ("1%",), "theta_weights": (99,)}, "out of range")):
        with pytest.raises(InputError, match=message):
            optimize(replace(opts, **changes))
        assert not (tmp_path / "out").exists()


def test_byte_budget_search_tries_convert_default_and_writes_what_convert_writes(tiny_f32: Path,
                                                                                tmp_path: Path) -> None:
    """convert's own knobs in the search: a byte budget is the file `convert --byte-budget` writes (one per budget
    and θ-weight count, in work/), convert's default is enqueued after the baseline and the seed point, and the
    best model is that file's tensors with its θ at the trial's γ."""
    import optuna

    from nkat_gguf.math.limits import DEFAULT_BYTE_BUDGET

    out = tmp_path / "out"
    opts = OptimizeOptions(
        convert=ConvertOptions(input=tiny_f32, output=out, threads=2, progress=False),
        output_dir=out, mode="custom", trials=3, ranks=(2,), byte_budgets=(DEFAULT_BYTE_BUDGET,), n_ctx=64,
        chunks=1, eval_chunks=1, speed_repetitions=1, n_gen=8, runtime=RuntimeOptions(n_ctx=512, n_threads=2),
        progress=False)
    summary = optimize(opts)
    study = optuna.load_study(study_name=opts.study_name, storage=summary["storage"])
    assert study.trials[2].params["byte_budget"] == DEFAULT_BYTE_BUDGET  # convert's default, tried third
    assert f"generation_speed:bytes={DEFAULT_BYTE_BUDGET}|weights=default" in study.user_attrs
    assert summary["search_space"]["byte_budget"] == ["none", DEFAULT_BYTE_BUDGET]
    source = next((out / "work").glob(f"byte_budget{DEFAULT_BYTE_BUDGET.replace('%', 'pct')}_weightsdefault-*"))
    assert read_theta(source).tensors  # convert's default file, θ allocated on some weights
    best, model = summary["best"]["params"], Path(summary["files"]["model"])
    if best.get("byte_budget", "none") != "none":
        assert [(t.name, t.type) for t in read_layout(model).tensors] == [
            (t.name, t.type) for t in read_layout(source).tensors]
        assert read_theta(model).ranks == read_theta(source).ranks
