"""nkat-gguf optimize through its Python API on a tiny random llama (Q4_0): outputs, resume, best model, Pareto."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from nkat_gguf.convert import ConvertOptions
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime, RuntimeOptions
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.optimizer.options import OptimizeOptions
from nkat_gguf.optimizer.outputs import write_best
from nkat_gguf.optimizer.score import SCORE_DEFINITION, slowdown, tpe_score
from nkat_gguf.optimizer.storage import DB_NAME
from nkat_gguf.optimizer.study import optimize
from nkat_gguf.texts import builtin_text

RUNTIME = RuntimeOptions(n_ctx=512, n_threads=2)
TRIALS = 6


def search_options(model: Path, output_dir: Path, **changes: object) -> OptimizeOptions:
    base = OptimizeOptions(
        convert=ConvertOptions(input=model, output=output_dir, outtype="Q4_0", threads=2, progress=False),
        output_dir=output_dir, mode="custom", trials=TRIALS, n_ctx=64, chunks=1, eval_chunks=1,
        speed_repetitions=1, n_gen=16, runtime=RUNTIME, progress=False)
    return replace(base, **changes)


@pytest.fixture(scope="module")
def searched(tiny_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[OptimizeOptions, dict]:
    opts = search_options(tiny_f32, tmp_path_factory.mktemp("search") / "out")  # created by optimize
    return opts, optimize(opts)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_outputs_present_and_well_formed(searched: tuple[OptimizeOptions, dict]) -> None:
    opts, summary = searched
    out = opts.output_dir
    history = read_json(out / "optimization_history.json")
    study = read_json(out / "optuna_study.json")
    assert study == json.loads(json.dumps({k: v for k, v in summary.items() if k != "trials_run_here"}))
    assert history["score_definition"] == study["score_definition"] == SCORE_DEFINITION
    trials = history["trials"]
    assert [t["number"] for t in trials] == list(range(TRIALS)) and summary["trials_run_here"] == list(range(TRIALS))
    assert study["trials"] == {"requested": TRIALS, "all": TRIALS, "complete": TRIALS, "fail": 0, "running": 0,
                                    "waiting": 0, "pruned": 0}
    speeds = {int(r): v for r, v in study["generation_speed"]["tg_tokens_per_second"].items()}
    assert sorted(speeds) == [0, 2, 4, 6, 8] and all(v > 0 for v in speeds.values())
    for t in trials:
        rank, gamma = t["params"]["rank"], t["params"]["gamma"]
        assert t["state"] == "COMPLETE" and rank in (0, 2, 4, 6, 8) and t["seconds"] >= 0
        assert (gamma is None) == (rank == 0) and (gamma is None or 0.90 <= gamma <= 0.99)
        assert t["slowdown"] == slowdown(speeds[0], speeds[rank])
        assert t["tpe_score"] == tpe_score(t["ppl"], t["slowdown"])
    baseline = trials[0]["ppl"]
    assert all(t["ppl"] != baseline for t in trials if t["params"]["rank"])  # each adapter really is applied
    best = max(trials, key=lambda t: t["tpe_score"])
    assert study["best"] == best
    assert study["sampler"] == {"name": "TPESampler", "multivariate": True, "group": True, "constant_liar": True,
                                     "n_startup_trials": 4, "seed": 0}
    assert study["storage"] == f"sqlite:///{(out / DB_NAME).resolve()}"
    assert study["search_space"]["rank"] == [0, 2, 4, 6, 8] and study["search_space"]["gamma"] == [0.90, 0.99]
    report = read_json(Path(study["files"]["report"]))
    assert report["score_definition"] == SCORE_DEFINITION
    assert report["config"]["trial"] == best["number"] and report["search"]["split"] == "calibration"
    assert report["evaluation"]["text"] == "pydoc_data.topics:evaluation"
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_baseline_and_seed_point_run_first(searched: tuple[OptimizeOptions, dict]) -> None:
    opts, _ = searched
    trials = read_json(opts.output_dir / "optimization_history.json")["trials"]
    assert trials[0]["params"] == {"rank": 0, "gamma": None}
    assert trials[1]["params"] == {"rank": 4, "gamma": 0.97}


def test_plot_is_a_real_image(searched: tuple[OptimizeOptions, dict]) -> None:
    import matplotlib.image

    opts, _ = searched
    path = opts.output_dir / "optimization_results.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 600 and pixels.shape[1] > 600 and float(pixels.std()) > 0.05


def check_model_matches_report(opts: OptimizeOptions, files: dict[str, str]) -> dict:
    """The written model is the searched point, and re-measuring it gives its JSON's figures."""
    report = read_json(Path(files["report"]))
    config, model = report["config"], Path(files["model"])
    rank, gamma = config["rank"], config["gamma"]
    gamma_text = f"{gamma:.4f}".rstrip("0").rstrip(".") or "0"
    assert model.name == f"optimal_rank{rank}_gamma{gamma_text}.nkat.gguf" and config["model"] == str(model)
    assert Path(files["report"]).name == f"optimal_rank{rank}_gamma{gamma_text}.json"
    base = next((opts.output_dir / "work").glob("theta_rank8-*.nkat.gguf"))
    assert [t.name for t in read_layout(model).tensors] == [t.name for t in read_layout(base).tensors]
    with NkatRuntime(model, RUNTIME) as runtime:
        assert (runtime.theta.rank if runtime.has_theta else 0) == rank
        assert runtime.gamma == (pytest.approx(gamma, rel=1e-6) if rank else None)
        calibration = perplexity(runtime.llm, tokenize_text(runtime.llm, builtin_text("calibration").content),
                                 opts.n_ctx, opts.chunks, progress=False)
        evaluation = perplexity(runtime.llm, tokenize_text(runtime.llm, builtin_text("evaluation").content),
                                opts.n_ctx, opts.eval_chunks, progress=False)
    assert calibration.ppl == pytest.approx(report["search"]["ppl"], rel=1e-6)
    side = "theta" if rank else "theta_off"
    assert evaluation.ppl == pytest.approx(report["evaluation"]["perplexity"][side]["ppl"], rel=1e-6)
    assert report["evaluation"]["theta_enabled"] == (rank > 0)
    return report


def test_best_model_loads_and_matches_its_json(searched: tuple[OptimizeOptions, dict]) -> None:
    opts, summary = searched
    check_model_matches_report(opts, summary["files"])


def test_a_theta_point_is_written_and_compared_alike(searched: tuple[OptimizeOptions, dict], tmp_path: Path) -> None:
    """The seed's point (theta on) through the same writer, whichever trial the random tiny model prefers."""
    opts, summary = searched
    study = optuna.load_study(study_name=opts.study_name, storage=summary["storage"])
    seed_trial = study.trials[1]
    out = replace(opts, output_dir=tmp_path)
    shutil.copytree(opts.output_dir / "work", tmp_path / "work")
    base = next((tmp_path / "work").glob("*.nkat.gguf"))
    files = write_best(study, seed_trial, lambda _config: base, builtin_text("evaluation"), out, summary["storage"])
    report = check_model_matches_report(out, files)
    assert (report["config"]["rank"], report["config"]["gamma"]) == (4, 0.97)
    speed = report["evaluation"]["speed"]
    assert set(speed) == {"theta_off", "theta"} and report["evaluation"]["overhead_percentage"]["tg"] == pytest.approx(
        100 * (speed["theta_off"]["tg_tokens_per_second"] / speed["theta"]["tg_tokens_per_second"] - 1))


def test_rerun_continues_to_a_larger_total_without_rebuilding(
        searched: tuple[OptimizeOptions, dict], tmp_path: Path) -> None:
    opts, _ = searched
    copy = tmp_path / "copy"
    shutil.copytree(opts.output_dir, copy)
    base = next((copy / "work").glob("*.nkat.gguf"))
    built = base.stat().st_mtime_ns
    before = read_json(copy / "optuna_study.json")

    summary = optimize(replace(opts, output_dir=copy, trials=TRIALS + 2))

    after = read_json(copy / "optimization_history.json")["trials"]
    assert summary["trials_run_here"] == [TRIALS, TRIALS + 1] and len(after) == TRIALS + 2
    assert after[:TRIALS] == read_json(opts.output_dir / "optimization_history.json")["trials"]
    assert base.stat().st_mtime_ns == built  # quantized and fitted once
    assert summary["generation_speed"] == before["generation_speed"]  # speeds measured once per study


def test_other_settings_on_the_same_study_are_refused(searched: tuple[OptimizeOptions, dict], tmp_path: Path) -> None:
    opts, _ = searched
    copy = tmp_path / "copy"
    shutil.copytree(opts.output_dir, copy)
    with pytest.raises(InputError, match=r"other settings .*ranks: \[2, 4, 6, 8\] there, \[2, 4\] here"):
        optimize(replace(opts, output_dir=copy, ranks=(2, 4)))
    with pytest.raises(InputError, match="--pareto differs"):
        optimize(replace(opts, output_dir=copy, pareto=True))


def test_pareto_reports_the_front(tiny_f32: Path, tmp_path: Path) -> None:
    opts = search_options(tiny_f32, tmp_path / "pareto", pareto=True, trials=5, ranks=(2, 4))
    summary = optimize(opts)
    study = read_json(tmp_path / "pareto" / "optuna_study.json")
    assert study["directions"] == ["minimize", "minimize"] and study["score_definition"] == SCORE_DEFINITION
    front = study["pareto_front"]
    trials = [t for t in read_json(tmp_path / "pareto" / "optimization_history.json")["trials"]
              if t["state"] == "COMPLETE"]
    assert front and len(trials) == 5

    def dominates(a: dict, b: dict) -> bool:
        return a["ppl"] <= b["ppl"] and a["slowdown"] <= b["slowdown"] and (a["ppl"], a["slowdown"]) != (
            b["ppl"], b["slowdown"])

    assert not any(dominates(t, f) for f in front for t in trials)
    for t in trials:  # everything off the front is dominated by it (or ties with a member)
        assert t in front or any(dominates(f, t) or (f["ppl"], f["slowdown"]) == (t["ppl"], t["slowdown"])
                                 for f in front)
    assert study["best"] == max(front, key=lambda t: t["tpe_score"])
    assert Path(summary["files"]["model"]).is_file() and Path(summary["files"]["report"]).is_file()
    assert (tmp_path / "pareto" / "optimization_results.png").stat().st_size > 10_000
