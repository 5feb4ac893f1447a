"""SO8T: SO(8) block rotations baked into the weights, as one package (docs/SO8T.md).

Modules: `rotations.py` (the SO(8) block math), `checkpoint.py` (trained-gate checkpoints, docs/SO8T_CHECKPOINT.md),
`bake.py` (plan and bake), `qc.py` (before/after comparison), `options.py` (convert's SO8T options and their
checks), `bake_step.py` (convert's bake step), `fake_quant.py` and `train.py` (`nkat-gguf so8t train`).

convert knows SO8T only through the names below: the options, their check (run with convert's other checks,
before any work; it returns the plan to bake) and the bake step its pipeline calls when there is one.
"""

from nkat_gguf.so8t.bake import BakePlan
from nkat_gguf.so8t.bake_step import BakeStep, bake_for_convert
from nkat_gguf.so8t.options import So8tOptions, check_so8t_options

__all__ = ["BakePlan", "BakeStep", "So8tOptions", "bake_for_convert", "check_so8t_options"]
