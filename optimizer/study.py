"""`nkat-gguf optimize`: an Optuna TPE search over convert's knobs (base type, byte budget, θ weights, θ rank,
θ budget) and γ, resumable and shareable.

check options -> open the study (fails fast on a bad storage) -> build the first base -> load it
-> speeds per rank once -> trials until the study has enough (other files built and loaded as trials ask for
them) -> outputs from the storage.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from tqdm import tqdm

from nkat_gguf.convert import ConvertOptions
from nkat_gguf.convert.calib_text import calibration_text
from nkat_gguf.convert.checks import check_rank
from nkat_gguf.convert.selection import select_tensors
from nkat_gguf.convert.sensitivity import SENSITIVITY_RANK, held_out_tokens, sensitivity_on
from nkat_gguf.engine.llama.probe import check_model
from nkat_gguf.engine.llama.quantize import resolve_outtype
from nkat_gguf.engine.llama.vocab import tokenize
from nkat_gguf.engine.measure.perplexity import tokenize_text
from nkat_gguf.errors import InputError
from nkat_gguf.format.atomic import make_output_dir
from nkat_gguf.format.gguf_file import read_layout
from nkat_gguf.format.hashing import sha256_file
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.allocation import check_max_weights, parse_budget
from nkat_gguf.optimizer.base_model import (
    SENSITIVITY_ATTR,
    WORK_DIR,
    SearchModel,
    base_key,
    build_name,
    build_options,
    remove_stale,
    search_base,
)
from nkat_gguf.optimizer.objective import Objective
from nkat_gguf.optimizer.options import (
    NO_BUDGET,
    Build,
    OptimizeOptions,
    ThetaConfig,
    check_options,
    default_point,
    seed_point,
)
from nkat_gguf.optimizer.outputs import write_outputs
from nkat_gguf.optimizer.speed import config_speed, rank_speeds
from nkat_gguf.optimizer.storage import HEARTBEAT_SECONDS, adopt_running_trials, open_storage, open_study, storage_url
from nkat_gguf.texts import Text, load_text

N_STARTUP_TRIALS = 4  # the two enqueued points count among them


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's line per trial and its experimental-feature warnings would break the progress bar."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def sampler_settings(seed: int) -> dict[str, Any]:
    return {"name": "TPESampler", "multivariate": True, "group": True, "constant_liar": True,
            "n_startup_trials": N_STARTUP_TRIALS, "seed": seed}


def make_sampler(settings: dict[str, Any]) -> optuna.samplers.TPESampler:
    """Multivariate TPE; `group` because γ exists only for rank > 0; the constant liar spreads parallel workers."""
    return optuna.samplers.TPESampler(**{k: v for k, v in settings.items() if k != "name"})


def first_points(opts: OptimizeOptions) -> list[dict[str, Any]]:
    """Enqueued before any sampling: the baseline (theta off on the first base type), the seed's recommended
    point, and convert's own default where the space holds it (so the search starts from what convert writes)."""
    rank, gamma = seed_point(opts.ranks, opts.gamma_range)
    first = ({"outtype": opts.base_types[0]} if len(opts.base_types) > 1 else {}) \
        | ({"byte_budget": NO_BUDGET} if opts.byte_budgets else {})
    seed = {"rank": rank} | ({"theta_budget": NO_BUDGET} if opts.theta_budgets else {}) | {"gamma": gamma}
    default = default_point(opts)
    return [first | {"rank": 0}, first | seed] + ([default] if default else [])


def study_settings(opts: OptimizeOptions, input_sha256: str, key: str, calibration: Text) -> dict[str, Any]:
    """What makes trials comparable; a worker or rerun with different values is refused."""
    return {"model_sha256": input_sha256, "base_key": key, "outtypes": list(opts.base_types),
            "calibration_text_sha256": calibration.sha256, "ranks": list(opts.ranks),
            "gamma_range": list(opts.gamma_range), "n_ctx": opts.n_ctx, "chunks": opts.chunks,
            "byte_budgets": list(opts.byte_budgets), "theta_budgets": list(opts.theta_budgets),
            "theta_weights": list(opts.theta_weights), "n_gen": opts.n_gen,
            "speed_repetitions": opts.speed_repetitions}


def run_trials(study: optuna.Study, storage: RDBStorage, objective: Callable[[optuna.Trial], Any], total: int,
               progress: bool) -> list[int]:
    """Run trials until the study has `total` complete ones; returns the numbers of those run here.

    Trials running elsewhere count as on their way. A dead worker's trial is failed once its heartbeat is
    stale and its parameters are queued again, so this loop waits for it rather than stopping short.
    Workers that start their last trials at the same moment can overshoot by one trial each.
    """
    ran: list[int] = []
    adopted: set[int] = set()
    with tqdm(total=total, desc="trials", unit="trial", file=sys.stderr, disable=not progress) as bar:
        while True:
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            adopt_running_trials(storage, trials, adopted)
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            running = sum(t.state == TrialState.RUNNING for t in trials)
            bar.n = min(len(complete), total)
            if complete:
                bar.set_postfix_str(f"best TPE {max(t.user_attrs['tpe_score'] for t in complete):.6f}", refresh=False)
            bar.refresh()
            if len(complete) >= total:
                return ran
            if len(complete) + running >= total:
                time.sleep(HEARTBEAT_SECONDS)
                continue
            study.optimize(objective, n_trials=1, callbacks=[lambda _, trial: ran.append(trial.number)])


@dataclass(frozen=True)
class Search:
    """An open study with its base model built: everything a trial needs but the loaded model."""

    opts: OptimizeOptions  # output_dir created
    total: int  # complete trials to reach
    study: optuna.Study
    storage: RDBStorage
    url: str
    sampler: dict[str, Any]
    files: dict[Build, Path]  # every file the search may use, by build; built when a trial first needs it
    calibration: Text
    evaluation: Text

    @property
    def base(self) -> Path:
        """The first base type's file, θ at the largest rank: the baseline and the θ-budget cuts."""
        return self.file(ThetaConfig(0))

    def file(self, config: ThetaConfig) -> Path:
        build = config.build(self.opts.base_types)
        rank = max(self.opts.ranks)
        return search_base(replace(build_options(self.opts.convert, build, rank), progress=self.opts.progress),
                           self.files[build])


def open_search(opts: OptimizeOptions) -> Search:
    """Check everything cheap first, then open the study (a bad storage fails here), then build the base once."""
    total = check_options(opts)
    model = Path(opts.convert.input)
    if not model.is_file():
        raise InputError(f"no such file: {model}")
    if opts.best_model is not None and opts.best_model.is_dir():
        raise InputError(f"--output {opts.best_model} is a directory; give a file name")
    calibration = calibration_text(opts.convert.calib_text, Path(opts.convert.reference or model))
    evaluation = load_text(opts.eval_text, "evaluation")
    for budget in opts.theta_budgets:  # each refused in one line before any work
        parse_budget(budget, model.stat().st_size)
    for budget in opts.byte_budgets:
        parse_budget(budget, model.stat().st_size, "--byte-budget")
    layout = read_layout(model)
    for outtype in opts.base_types:
        resolve_outtype(outtype, layout)
    if opts.theta_weights:
        check_max_weights(max(opts.theta_weights), len(select_tensors(layout, opts.convert.selective_layers)))
    rank = max(opts.ranks)
    _check_model(opts, model, rank, calibration)  # before the study database or work directory exists
    input_sha256 = sha256_file(model)
    keys = {build: base_key(build_options(opts.convert, build, rank), rank, input_sha256, calibration)
            for build in builds(opts)}
    key = keys[ThetaConfig(0).build(opts.base_types)]
    url = storage_url(opts.storage, Path(opts.output_dir))
    if opts.storage is None:  # the SQLite file lives in the output directory
        make_output_dir(Path(opts.output_dir))
    storage = open_storage(url)
    opts = replace(opts, output_dir=make_output_dir(Path(opts.output_dir)))
    directions = ["minimize", "minimize"] if opts.pareto else ["maximize"]
    study, created = open_study(storage, opts.study_name, directions,
                                study_settings(opts, input_sha256, key, calibration))
    sampler = sampler_settings(opts.seed + len(study.get_trials(deepcopy=False)))  # a rerun draws anew
    study.sampler = make_sampler(sampler)
    if created:
        for params in first_points(opts):
            study.enqueue_trial(params)
    files = {build: opts.output_dir / WORK_DIR / build_name(build, rank, k) for build, k in keys.items()}
    remove_stale(opts.output_dir / WORK_DIR, set(files.values()))
    search = Search(opts, total, study, storage, url, sampler, files, calibration, evaluation)
    search.file(ThetaConfig(0))  # the first base, built now: a bad convert option fails before the first trial
    return search


def builds(opts: OptimizeOptions) -> list[Build]:
    """Every file the search may use: each base type uniform, and with each byte budget and θ-weight count."""
    weights = opts.theta_weights or (None,)
    return [Build(t) for t in opts.base_types] + [Build(t, b, w) for t in opts.base_types
                                                  for b in opts.byte_budgets for w in weights]


def _check_model(opts: OptimizeOptions, model: Path, rank: int, calibration: Text) -> None:
    """The model loads, every searched rank fits its weights, --ctx fits its context and the calibration text."""
    layout = check_model(model, opts.n_ctx)
    check_rank(TensorSource(model, layout), select_tensors(layout, opts.convert.selective_layers), rank)
    if opts.convert.reference is not None and not Path(opts.convert.reference).is_file():
        raise InputError(f"no such file: {opts.convert.reference}")
    n_tokens = len(tokenize(model, calibration.content))
    if n_tokens < opts.n_ctx:
        raise InputError(f"calibration text has {n_tokens} tokens; one chunk needs --ctx {opts.n_ctx}")


def make_objective(search: Search, model: SearchModel) -> Objective:
    """The trial function over the loaded model: calibration tokens once, speeds per rank once per study."""
    opts = search.opts
    tokens = tokenize_text(model.runtime.llm, search.calibration.content)
    if len(tokens) < opts.n_ctx:
        raise InputError(f"calibration text has {len(tokens)} tokens; one chunk needs --ctx {opts.n_ctx}")
    speeds = rank_speeds(search.study, model, opts.ranks, opts.n_gen, opts.speed_repetitions, opts.progress)
    if opts.theta_budgets:
        model.sensitivity = study_sensitivity(search.study, model, search.calibration, opts.progress)

    def speed_of(config: ThetaConfig) -> tuple[float, float]:
        if not config.theta_on:  # θ off costs nothing: λθ = 0
            return speeds[0], speeds[0]
        if config.theta_budget == NO_BUDGET and config.byte_budget == NO_BUDGET and config.outtype in (
                None, opts.base_types[0]):
            return speeds[0], speeds[config.rank]
        return config_speed(search.study, model, config, opts.n_gen, opts.speed_repetitions, opts.progress)

    return Objective(model, tokens, opts, speed_of)


def study_sensitivity(study: optuna.Study, model: SearchModel, calibration: Text, progress: bool) -> dict[str, float]:
    """Per-kind sensitivity of the base's theta on held-out calibration text, measured once per study."""
    stored = study.user_attrs.get(SENSITIVITY_ATTR)
    if stored is None:
        model.load(ThetaConfig(0))  # the first base type's uniform file
        full = model.full
        energy = {n: (t.dequantize().b.astype("float64") ** 2).sum(axis=0) for n, t in full.tensors.items()}
        thetas = {n: t.truncate(min(SENSITIVITY_RANK, t.rank)) for n, t in full.tensors.items()}
        measured = sensitivity_on(model.runtime, thetas, energy, held_out_tokens(model.base, calibration),
                                  full.gamma, progress)
        stored = {k: v["sensitivity"] for k, v in measured.items()}
        study.set_user_attr(SENSITIVITY_ATTR, stored)
    return stored


def optimize(opts: OptimizeOptions) -> dict[str, Any]:
    """Run (or continue) the study up to the requested number of complete trials and write every output."""
    with quiet_optuna():
        search = open_search(opts)
        with SearchModel(search.file, ThetaConfig(0), opts.runtime) as model:
            ran = run_trials(search.study, search.storage, make_objective(search, model), search.total,
                             opts.progress)
        summary = write_outputs(search.study, search.opts, search.total, search.url, search.sampler, search.file,
                                search.evaluation)
    return {**summary, "trials_run_here": ran}


def optimize_convert(opts: ConvertOptions, **search: Any) -> dict[str, Any]:
    """`convert --optimize-rank`: a quick study in OUTPUT.optimize/, whose best model is written to OUTPUT.

    `search` overrides other OptimizeOptions fields (the command line uses the defaults).
    """
    output = Path(opts.output)
    return optimize(OptimizeOptions(convert=opts, output_dir=output.with_name(output.name + ".optimize"),
                                    best_model=output, progress=opts.progress, **search))
