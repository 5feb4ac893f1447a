"""convert's option checks: every option checked once, by the module that owns its value, before any work.

`check_options` is the one place a `convert` call's options are checked: the paths here, γ and imatrix files
by format/, the type by llama.cpp's quantizer, the weights by selection.py, θ's fit by theta_fit.py, the
budgets by math/allocation.py, --calib-memory by moment_groups.py, --max-memory by memory.py (the peak by
docs/CALIBRATION.md's formula, from the tensor shapes), and SO8T's options by SO8T. Every
refusal is one line; what the checks resolve (types, weights, budgets, the rotation plan) is what the
later steps use, so no step parses an option again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf.constants import Keys

from nkat_gguf.convert.allocate import ALLOCATION_MAX_RANK
from nkat_gguf.convert.calibrate import Calibration
from nkat_gguf.convert.memory import MemoryEstimate, check_max_memory, estimate
from nkat_gguf.convert.moment_groups import parse_memory
from nkat_gguf.convert.options import ConvertOptions
from nkat_gguf.convert.selection import resolve_tensor_types, select_tensors
from nkat_gguf.convert.theta_fit import FitSettings, check_fit
from nkat_gguf.convert.theta_train import TrainSettings, check_train_options
from nkat_gguf.engine.llama.quantize import resolve_outtype
from nkat_gguf.engine.llama.runtime import check_loadable
from nkat_gguf.errors import InputError
from nkat_gguf.format.atomic import check_writable_dir
from nkat_gguf.format.gguf_file import GGUFLayout, read_layout
from nkat_gguf.format.imatrix import input_widths, read_imatrix_file
from nkat_gguf.format.nkat import check_gamma
from nkat_gguf.format.tensors import TensorSource
from nkat_gguf.math.allocation import ThetaBudget, check_max_weights, parse_budget
from nkat_gguf.math.limits import DEFAULT_THETA_WEIGHTS
from nkat_gguf.so8t import BakePlan, check_so8t_options


@dataclass(frozen=True)
class CheckedOptions:
    """The options once checked against the input: the model, its weights to fit θ on, and what later steps need."""

    opts: ConvertOptions  # resolved: convert's defaults filled in
    layout: GGUFLayout
    source: TensorSource  # the input model
    reference: TensorSource  # W_ref: the input itself, or the --reference GGUF
    names: list[str]  # the weights that may carry θ
    outtype: str  # llama-quantize's name of the output type
    ftype: int  # its llama_ftype
    fit: FitSettings
    so8t: BakePlan | None  # --so8t: the rotations to bake; None: no bake
    budget: ThetaBudget | None  # --theta-budget: θ ranks only
    tensor_types: dict[str, object]  # --tensor-type: weight name -> GGML type, by hand
    byte_budget: ThetaBudget | None  # --byte-budget: types and θ ranks allocated together
    theta_weights: int | None  # under either budget, the most weights that carry θ (0: none, types only)
    calib_memory: int  # --calib-memory in bytes
    needs_calibration: bool  # convert calibrates (unless a calibration is passed in)
    reads_text: bool  # a step reads the calibration text
    memory: MemoryEstimate  # the peak by docs/CALIBRATION.md's formula, checked against --max-memory


def check_options(opts: ConvertOptions, calibration: Calibration | None) -> CheckedOptions:
    """Every option checked against the input, each by its owner (`calibration`: one passed in to reuse)."""
    input_path, output_path = Path(opts.input), Path(opts.output)
    layout = read_layout(input_path)
    _check_paths(input_path, output_path, opts.reference)
    if opts.save_imatrix is not None:
        _check_imatrix_path(Path(opts.save_imatrix), input_path, output_path, calibration)
    check_gamma(opts.gamma)
    check_loadable(input_path)
    source = TensorSource(input_path, layout)
    so8t = check_so8t_options(opts.so8t, source, opts.imatrix, reuses_calibration=calibration is not None)
    if opts.imatrix not in ("auto", "none"):  # a bad file fails now, not after the calibration
        read_imatrix_file(Path(opts.imatrix), input_widths(layout))
    outtype, ftype = resolve_outtype(opts.outtype, layout)
    names = select_tensors(layout, opts.selective_layers)
    check_rank(source, names, opts.theta_rank)
    fit = check_fit(opts.theta_fit, opts.theta_damping, opts.theta_rounds)
    calib_memory = parse_memory(opts.calib_memory)
    budget = check_budget_options(opts, input_path.stat().st_size)
    tensor_types = resolve_tensor_types(layout, opts.tensor_types)
    byte_budget = check_mix_options(opts, input_path.stat().st_size)
    theta_weights = check_theta_weights(opts, len(names))
    reference = reference_source(source, opts.reference)
    wants_theta = opts.theta_rank > 0 or budget is not None
    check_train_options(TrainSettings.of(opts), layout, wants_theta and theta_weights != 0)
    needs_calibration = ((opts.theta_calib == "activation" and wants_theta) or opts.imatrix == "auto"
                         or opts.save_imatrix is not None)
    reads_text = ((needs_calibration and calibration is None) or budget is not None or byte_budget is not None
                  or opts.calibrate_temperature or opts.theta_train != "none")
    file_bytes = max(input_path.stat().st_size, Path(opts.reference).stat().st_size if opts.reference else 0)
    allocates = budget is not None or byte_budget is not None
    memory = estimate(layout, file_bytes, names, calib_memory,
                      opts.theta_fit == "whiten" and opts.theta_calib == "activation" and (wants_theta or allocates),
                      ALLOCATION_MAX_RANK if allocates else opts.theta_rank, needs_calibration and calibration is None)
    check_max_memory(opts.max_memory, memory)
    return CheckedOptions(opts, layout, source, reference, names, outtype, ftype, fit, so8t, budget, tensor_types,
                          byte_budget, theta_weights, calib_memory, needs_calibration, reads_text, memory)


def reference_source(input_source: TensorSource, reference: Path | None) -> TensorSource:
    """Where W_ref is read: the input itself, or a higher-precision GGUF of the same model (checked here)."""
    if reference is None:
        return input_source
    ref = TensorSource(reference)
    if ref.layout.get(Keys.General.ARCHITECTURE) != input_source.layout.get(Keys.General.ARCHITECTURE):
        raise InputError(f"--reference {reference.name} is a different architecture from the input")
    for name in [t.name for t in input_source.layout.tensors]:
        if name not in ref:
            raise InputError(f"--reference {reference.name} has no tensor {name}; it must be the same model")
        if ref.numpy_shape(name) != input_source.numpy_shape(name):
            raise InputError(f"--reference {reference.name}: {name} is {ref.numpy_shape(name)}, "
                             f"input has {input_source.numpy_shape(name)}")
    return ref


def check_rank(source: TensorSource, names: list[str], rank: int) -> None:
    if rank < 0:
        raise InputError(f"--theta-rank must be >= 0, got {rank}")
    for name in names:
        smallest = min(source.numpy_shape(name))
        if rank > smallest:
            raise InputError(f"--theta-rank {rank} is larger than {name}'s smaller dimension {smallest}")


def check_budget_options(opts: ConvertOptions, model_bytes: int) -> ThetaBudget | None:
    """--theta-budget (θ ranks only), refused in one line before any work is done."""
    if opts.theta_budget is None:
        return None
    if opts.theta_rank == 0:
        raise InputError("--theta-budget asks for theta but --theta-rank 0 asks for none; give one of them")
    return parse_budget(opts.theta_budget, model_bytes)


def check_mix_options(opts: ConvertOptions, model_bytes: int) -> ThetaBudget | None:
    """--byte-budget (types and θ ranks together), refused in one line before any work is done."""
    if opts.byte_budget is None:
        return None
    if opts.theta_budget is not None:
        raise InputError("--byte-budget allocates types and theta together; it cannot be combined with --theta-budget")
    return parse_budget(opts.byte_budget, model_bytes, "--byte-budget")


def check_theta_weights(opts: ConvertOptions, n_weights: int) -> int | None:
    """--theta-weights: under a budget, the most weights that carry θ (0: none, types only); by default
    DEFAULT_THETA_WEIGHTS capped at the model's weights. None without a budget (uniform rank: every selected weight)."""
    count = opts.theta_weights
    if isinstance(count, bool) or not isinstance(count, (int, type(None))):
        raise InputError(f"--theta-weights must be a whole number of weights, got {count!r}")
    if opts.byte_budget is None and opts.theta_budget is None:
        if count is not None:
            raise InputError(f"--theta-weights {count} caps a budget's allocation; --theta-rank {opts.theta_rank} "
                             "puts theta on every selected weight (choose them with --selective-layers)")
        return None
    check_max_weights(count, n_weights)
    if opts.theta_rank == 0:
        if count:
            raise InputError(f"--theta-weights {count} asks for theta but --theta-rank 0 asks for none")
        return 0
    if count == 0 and opts.theta_budget is not None:
        raise InputError("--theta-budget asks for theta but --theta-weights 0 allows it on no weight")
    return min(DEFAULT_THETA_WEIGHTS, n_weights) if count is None else count


def _check_paths(input_path: Path, output_path: Path, reference: Path | None) -> None:
    if output_path.exists() and output_path.is_dir():
        raise InputError(f"--output {output_path} is a directory; give a file name")
    check_writable_dir(output_path.parent.resolve())
    for other in (input_path, reference):
        if other is not None and output_path.exists() and output_path.resolve() == Path(other).resolve():
            raise InputError(f"--output would overwrite the input {other}; choose another file")
    if reference is not None and not Path(reference).is_file():
        raise InputError(f"no such file: {reference}")


def _check_imatrix_path(path: Path, input_path: Path, output_path: Path, calibration: Calibration | None) -> None:
    if calibration is not None:
        raise InputError("--save-imatrix writes convert's own calibration; it cannot be combined with a passed-in one")
    if path.exists() and path.is_dir():
        raise InputError(f"--save-imatrix {path} is a directory; give a file name")
    check_writable_dir(path.parent.resolve())
    for other, what in ((input_path, "the input"), (output_path, "--output")):
        if path.resolve() == Path(other).resolve():
            raise InputError(f"--save-imatrix would overwrite {what} {other}; choose another file")
