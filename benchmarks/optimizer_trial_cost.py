"""What one optimize trial costs next to a bare perplexity evaluation of the same chunks, as JSON.

A trial should be little more than its perplexity measurement: the model is loaded once, each rank's
adapter is loaded once, γ is only the adapter's scale, speeds are measured once per study. This runs
real trials (the TPE sampler, the SQLite storage with its heartbeat, the adapter switch and KV reset)
and, right after each, times `engine.perplexity` alone on the same chunks in the same configuration,
so machine drift hits both alike. Target: ratio <= 1.3. On a machine shared with other work that
ratio carries the noise of two separate timings; `ratio_to_own_perplexity` (a trial's wall time over
the perplexity call inside it) is the optimizer's own overhead and barely moves with load. Trials that
reuse an earlier identical configuration cost almost nothing and are left out.

    .venv/bin/python benchmarks/optimizer_trial_cost.py --trials 6 --chunks 4

The base model (quantized, theta at rank 8) is kept in --work-dir, so only the first run builds it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from nkat_gguf.convert import ConvertOptions
from nkat_gguf.default_model import resolve_model
from nkat_gguf.engine.measure.perplexity import perplexity
from nkat_gguf.engine.llama.runtime import RuntimeOptions
from nkat_gguf.optimizer.base_model import SearchModel
from nkat_gguf.optimizer.options import OptimizeOptions, ThetaConfig
from nkat_gguf.optimizer.study import make_objective, open_search, quiet_optuna, run_trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--outtype", default="Q4_0")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "nkat-gguf" / "optimizer-bench")
    args = parser.parse_args()

    study_name = f"trial-cost-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh study in the reused directory
    opts = OptimizeOptions(
        convert=ConvertOptions(input=resolve_model(args.model), output=args.work_dir, outtype=args.outtype,
                               progress=False),
        output_dir=args.work_dir, mode="custom", trials=args.trials, study_name=study_name, n_ctx=args.ctx,
        chunks=args.chunks, runtime=RuntimeOptions(n_ctx=max(args.ctx, 512), n_threads=args.threads), progress=False)
    rows = []
    with quiet_optuna():
        search = open_search(opts)
        with SearchModel(search.file, ThetaConfig(0), opts.runtime) as model:
            objective = make_objective(search, model)
            for n in range(1, args.trials + 1):
                start = time.perf_counter()
                number = run_trials(search.study, search.storage, objective, n, progress=False)[-1]
                trial_seconds = time.perf_counter() - start
                trial = search.study.trials[number]
                rank, gamma = trial.params["rank"], trial.params.get("gamma")
                model.apply(rank, gamma)
                bare = perplexity(model.runtime.llm, objective.tokens, args.ctx, args.chunks, progress=False)
                attrs = trial.user_attrs["measurement"]
                rows.append({"trial": trial.number, "rank": rank, "gamma": gamma, "trial_seconds": trial_seconds,
                             "in_trial_perplexity_seconds": attrs["ppl_seconds"],
                             "bare_perplexity_seconds": bare.seconds, "same_ppl": bare.ppl == trial.user_attrs["ppl"],
                             "reused": attrs["reused_from"] is not None})
    measured = [r for r in rows if not r["reused"]]

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in measured)

    print(json.dumps({
        "model": str(opts.convert.input), "outtype": args.outtype, "n_ctx": args.ctx, "chunks": args.chunks,
        "threads": args.threads,
        "trials": len(rows), "trials_in_ratio": len(measured),
        "trial_seconds_mean": mean("trial_seconds"), "bare_perplexity_seconds_mean": mean("bare_perplexity_seconds"),
        "ratio": mean("trial_seconds") / mean("bare_perplexity_seconds"),
        "ratio_to_own_perplexity": mean("trial_seconds") / mean("in_trial_perplexity_seconds"),
        "target": 1.3, "load_average": os.getloadavg(), "per_trial": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
