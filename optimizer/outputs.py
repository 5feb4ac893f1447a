"""The output files, all derived from the storage after the trials (Optuna's study/storage split).

Whichever worker writes them sees every trial of every worker. The best model is measured once more
on the EVALUATION split, which the search never saw, against the same model with theta off.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nkat_gguf.engine.measure.speed import interleaved_speed
from nkat_gguf.engine.measure.perplexity import perplexity, tokenize_text
from nkat_gguf.engine.llama.runtime import NkatRuntime
from nkat_gguf.evaluate.compare import CompareSettings, compare
from nkat_gguf.format.atomic import atomic_output
from nkat_gguf.format.nkat import read_theta
from nkat_gguf.optimizer.base_model import SENSITIVITY_ATTR, write_model
from nkat_gguf.optimizer.options import NO_BUDGET, OptimizeOptions, ThetaConfig, rank_choices
from nkat_gguf.optimizer.plots import write_plots
from nkat_gguf.optimizer.score import SCORE_DEFINITION
from nkat_gguf.optimizer.speed import SPEED_ATTR
from nkat_gguf.optimizer.storage import SETTINGS_ATTR, public_url
from nkat_gguf.texts import Text

HISTORY_FILE = "optimization_history.json"
KNOBS = ("outtype", "byte_budget", "theta_budget", "theta_weights")  # trial parameters besides rank and γ
STUDY_FILE = "optuna_study.json"
PLOT_FILE = "optimization_results.png"


def write_json(path: Path, data: Any) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """One trial as the history lists it; γ is None when theta is off (rank 0)."""
    measured = t.user_attrs.get("measurement", {})
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
        else None
    return {"number": t.number, "state": t.state.name,
            "params": {"rank": t.params.get("rank"), "gamma": t.params.get("gamma"),
                       **{k: t.params[k] for k in KNOBS if k in t.params}},
            "ppl": t.user_attrs.get("ppl"), "slowdown": t.user_attrs.get("slowdown"),
            "tpe_score": t.user_attrs.get("tpe_score"), "seconds": seconds, "worker": measured.get("worker"),
            "reused_from": measured.get("reused_from"), "retry_of": t.system_attrs.get("failed_trial")}


def best_trial(study: optuna.Study, pareto: bool) -> FrozenTrial | None:
    """The highest TPE score; in a Pareto study, the front's member with the highest TPE score."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return max(study.best_trials, key=lambda t: t.user_attrs["tpe_score"]) if pareto else study.best_trial


def best_config(trial: FrozenTrial) -> tuple[ThetaConfig, float]:
    """(configuration, γ); theta off is written as rank 0 with γ 0."""
    return ThetaConfig.from_params(trial.params), trial.params.get("gamma", 0.0)


def model_stem(config: ThetaConfig, gamma: float) -> str:
    budget = config.byte_budget if config.byte_budget != NO_BUDGET else config.theta_budget
    what = f"byte_budget{budget}" if config.byte_budget != NO_BUDGET else f"rank{config.rank}" + (
        f"_budget{budget}" if budget != NO_BUDGET else "")
    weights = f"_weights{config.theta_weights}" if budget != NO_BUDGET and config.theta_weights is not None else ""
    outtype = f"_{config.outtype}" if config.outtype else ""
    return (f"optimal_{what.replace('%', 'pct')}{weights}{outtype}_gamma"
            f"{f'{gamma:.4f}'.rstrip('0').rstrip('.') or '0'}")


def final_comparison(model: Path, rank: int, text: Text, opts: OptimizeOptions) -> dict[str, Any]:
    """theta off vs the best theta on the evaluation split: `nkat-gguf compare`, or the baseline alone."""
    settings = CompareSettings(n_ctx=opts.n_ctx, n_chunks=opts.eval_chunks, repetitions=opts.speed_repetitions,
                               n_gen=opts.n_gen, progress=opts.progress)  # tg as the search measured it
    if rank > 0:
        return compare(model, text, opts.runtime, settings)
    with NkatRuntime(model, opts.runtime) as runtime:  # the best is theta off: nothing to compare it with
        result = perplexity(runtime.llm, tokenize_text(runtime.llm, text.content), opts.n_ctx, opts.eval_chunks,
                            opts.progress)
        speed = interleaved_speed(runtime, {"theta_off": None}, settings)
    return {"model": str(model), "text": text.source, "text_sha256": text.sha256, "theta_enabled": False,
            "n_ctx": opts.n_ctx, "chunks": result.n_chunks, "speed": speed,
            "overhead_percentage": {"pp": 0.0, "tg": 0.0}, "perplexity": {"theta_off": result.as_dict()}}


def write_best(study: optuna.Study, best: FrozenTrial, files: Callable[[ThetaConfig], Path], text: Text,
               opts: OptimizeOptions, storage: str) -> dict[str, str]:
    """optimal_rank{r}_gamma{g}.nkat.gguf (or opts.best_model) and its JSON with the final comparison."""
    config, gamma = best_config(best)
    stem = model_stem(config, gamma)
    model = write_model(files(config), config, gamma, opts.best_model or opts.output_dir / f"{stem}.nkat.gguf",
                        study.user_attrs.get(SENSITIVITY_ATTR))
    ranks = read_theta(model).ranks
    comparison = final_comparison(model, max(ranks.values(), default=0), text, opts)
    knobs = {k: best.params[k] for k in KNOBS if k in best.params}
    report = {
        "config": {"rank": config.rank, **knobs, "gamma": gamma, "theta_enabled": config.theta_on,
                   "model": str(model), "trial": best.number},
        "search": {"split": "calibration", "ppl": best.user_attrs["ppl"], "slowdown": best.user_attrs["slowdown"],
                   "tpe_score": best.user_attrs["tpe_score"], "study_name": study.study_name,
                   "storage": public_url(storage)},
        "score_definition": SCORE_DEFINITION,
        "evaluation": comparison,
    }
    report_path = write_json(opts.output_dir / f"{stem}.json", report)
    return {"model": str(model), "report": str(report_path)}


def study_summary(study: optuna.Study, opts: OptimizeOptions, total: int, storage: str, sampler: dict[str, Any],
                  best: FrozenTrial | None, files: dict[str, str]) -> dict[str, Any]:
    """optuna_study.json: what was searched, how, how far it got, and the best point."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name.lower() for t in trials)
    return {
        "study_name": study.study_name,
        "storage": public_url(storage),
        "directions": [d.name.lower() for d in study.directions],
        "objective": "minimize (ppl, slowdown); best = Pareto member with the highest TPE score" if opts.pareto
        else "maximize the TPE score",
        "score_definition": SCORE_DEFINITION,
        "search_space": {"rank": rank_choices(opts.ranks), "gamma": list(opts.gamma_range),
                         **({"outtype": list(opts.base_types)} if len(opts.base_types) > 1 else {}),
                         **({"byte_budget": [NO_BUDGET, *opts.byte_budgets]} if opts.byte_budgets else {}),
                         **({"theta_budget": [NO_BUDGET, *opts.theta_budgets]} if opts.theta_budgets else {}),
                         **({"theta_weights": list(opts.theta_weights)} if opts.theta_weights else {}),
                         "note": "rank 0 is theta off (the baseline) and has no gamma"
                                 + ("; a byte budget is convert --byte-budget's file (types and ranks allocated, "
                                    "no rank chosen)" if opts.byte_budgets else "")
                                 + ("; with a theta budget, rank caps each weight's rank" if opts.theta_budgets
                                    else "")
                                 + ("; theta_weights 0 is theta on no weight" if opts.theta_weights else "")},
        "settings": study.user_attrs.get(SETTINGS_ATTR),
        "sampler": sampler,
        "trials": {"requested": total, "all": len(trials), **{s.name.lower(): counts.get(s.name.lower(), 0)
                                                                  for s in TrialState}},
        "best": trial_record(best) if best else None,
        "pareto_front": [trial_record(t) for t in study.best_trials] if opts.pareto else None,
        "generation_speed": study.user_attrs.get(SPEED_ATTR),
        "files": files,
    }


def write_outputs(study: optuna.Study, opts: OptimizeOptions, total: int, storage: str, sampler: dict[str, Any],
                  files: Callable[[ThetaConfig], Path], evaluation: Text) -> dict[str, Any]:
    """Every output file, from the storage; returns the study summary (also written as optuna_study.json)."""
    out = opts.output_dir
    history = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    written = {"history": str(write_json(out / HISTORY_FILE, {"score_definition": SCORE_DEFINITION,
                                                               "trials": history})),
               "plot": str(write_plots(study, out / PLOT_FILE, opts.pareto)),
               "study": str(out / STUDY_FILE)}
    best = best_trial(study, opts.pareto)
    if best is not None:
        written.update(write_best(study, best, files, evaluation, opts, storage))
    summary = study_summary(study, opts, total, storage, sampler, best, written)
    write_json(out / STUDY_FILE, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    t, best = summary["trials"], summary["best"]
    lines = [f"study {summary['study_name']} in {summary['storage']}: {t['complete']} of {t['requested']} trials "
             f"complete ({t['fail']} failed)"]
    if best:
        gamma = best["params"]["gamma"]
        knobs = "".join(f", {k.replace('_', ' ')} {v}" for k, v in best["params"].items()
                        if k in KNOBS and v != NO_BUDGET)
        rank = best["params"]["rank"]
        lines.append(f"best: trial {best['number']}{'' if rank is None else f', rank {rank}'}{knobs}"
                     f"{f', gamma {gamma:.4f}' if gamma is not None else ' (theta off)'}: TPE {best['tpe_score']:.6f}, "
                     f"calibration ppl {best['ppl']:.4f}, slowdown {best['slowdown']:.3f}")
    lines += [f"wrote {role}: {path}" for role, path in summary["files"].items()]
    return "\n".join(lines)
