"""Every option more than one command takes, declared once; a command overrides only what differs (help, default).

`tests/test_cli_options.py` checks from the source that no option name is declared twice in this package.
Choice lists are read from the module that owns them (`LazyChoice`), ranges are the owners' too: γ is
checked by `format.nkat.check_gamma`, the one rule for γ wherever it comes from; choices and ranges that the
library checks as well live in `math/limits.py`, light enough to read at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import click

from nkat_gguf.math.limits import DEFAULT_OUTTYPE

if TYPE_CHECKING:
    from nkat_gguf.engine.llama.runtime import RuntimeOptions

Decorator = Callable[[Callable], Callable]
MODEL_HELP = "GGUF file, or 'default' for the embedded SmolLM2-135M-Instruct Q4_1."
GGUF_FILE = click.Path(dir_okay=False, path_type=Path)
TEXT_FILE = click.Path(dir_okay=False, path_type=Path)
DIRECTORY = click.Path(file_okay=False, path_type=Path)


class LazyChoice(click.Choice):
    """A click.Choice whose list comes from its owner module, imported only when a command needs it.

    Importing the owners (convert, engine) at start-up would load llama.cpp for every `--help`.
    """

    def __init__(self, load: Callable[[], Sequence[str]], case_sensitive: bool = True) -> None:
        self._load, self.case_sensitive = load, case_sensitive
        self._choices: tuple[str, ...] | None = None

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._choices is None:
            self._choices = tuple(self._load())
        return self._choices


class HiddenAliasOption(click.Option):
    """An option that still accepts its old spellings; they parse and name errors, but --help shows the new one."""

    def __init__(self, *args: Any, hidden_aliases: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = tuple(hidden_aliases)
        self.opts += list(self.hidden_aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts, self.opts = self.opts, [o for o in self.opts if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


def parse_gamma(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """γ as the library checks it (format.nkat.check_gamma); a bad one names the option that gave it."""
    from nkat_gguf.errors import InputError
    from nkat_gguf.format.nkat import check_gamma

    if value is None:
        return None
    try:
        return check_gamma(float(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number") from None
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


def _shared(*names: str, **base: Any) -> Callable[..., Decorator]:
    """The one declaration of an option; `make(*short, **overrides)` gives a command its variant: a short
    name (`-o`), another help, default or type."""

    def make(*short: str, **overrides: Any) -> Decorator:
        return click.option(*names, *short, **{**base, **overrides})

    return make


model = _shared("--model", "-m", default="default", show_default=True, help=MODEL_HELP)
input_model = _shared("--input", "input_", default="default", show_default=True, help=MODEL_HELP)
gamma = _shared("--gamma", cls=HiddenAliasOption, callback=parse_gamma, default=None,
                help="theta scale (default: the file's).")
reference = _shared("--reference", type=GGUF_FILE, default=None,
                    help="Higher-precision GGUF theta aims at and the gap is measured to (default: the input).")
outtype = _shared("--outtype", default=DEFAULT_OUTTYPE, show_default=True)
theta_rank = _shared("--theta-rank", type=int, default=None)
byte_budget = _shared("--byte-budget", default=None, metavar="SIZE")
theta_budget = _shared("--theta-budget", cls=HiddenAliasOption, default=None, metavar="SIZE")
# one name for how many weights carry θ, 0 meaning none (types only); the old spellings parse, unlisted
theta_weights = _shared("--theta-weights", cls=HiddenAliasOption, default=None, metavar="N")
text = _shared("--text", type=TEXT_FILE, default=None,
               help="UTF-8 text (default: the evaluation split of Python's pydoc topics).")
calib_text = _shared("--calib-text", type=TEXT_FILE, default=None,
                     help="Calibration text: a UTF-8 file; 'self' (text sampled from the reference model, seed 0); "
                          "'mix' (pydoc, stdlib docstrings, man pages; disjoint from both evaluation texts); "
                          "default: the calibration split of Python's pydoc topics.")
ctx = _shared("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk, as llama-perplexity -c.")
chunks = _shared("--chunks", type=click.IntRange(min=1), default=16, show_default=True)
repetitions = _shared("--repetitions", "-r", type=click.IntRange(min=1), default=3, show_default=True)
n_gen = _shared("--n-gen", type=click.IntRange(min=1), default=128, show_default=True)
seed = _shared("--seed", type=int, default=0, show_default=True)
threads = _shared("--threads", type=click.IntRange(min=1), default=None,
                  help="CPU threads for prompt and generation (default: one per physical core, as llama.cpp).")
output = _shared("--output", "-o", required=True, type=click.Path(path_type=Path))
output_dir = _shared("--output-dir", required=True, type=DIRECTORY)
out_dir = _shared("--out-dir", type=DIRECTORY, default=None,
                  help="Keep every file written here (created if missing; default: a temporary directory).")
report_dir = _shared("--report-dir", type=DIRECTORY, default=None)
as_json = _shared("--json", "as_json", is_flag=True, help="Print JSON.")


def model_argument(required: bool = True) -> Decorator:
    return click.argument("model", required=required)


def engine_options(fn: Callable) -> Callable:
    """Options every engine command takes: GPU offload (ignored by a CPU build), threads."""
    for option in reversed([
        click.option("--gpu-layers", type=int, default=-1, show_default=True,
                     help="Layers to offload to a GPU (-1: all). A CPU build of llama.cpp ignores it."),
        click.option("--no-cuda", is_flag=True, help="Offload nothing to a GPU (same as --gpu-layers 0)."),
        threads(),
    ]):
        fn = option(fn)
    return fn


def runtime_options(gpu_layers: int, no_cuda: bool, threads: int | None, n_ctx: int = 512,
                    n_batch: int | None = None, **extra: Any) -> RuntimeOptions:
    """The engine options as llama.cpp's. `n_batch`: the most tokens one decode needs (a perplexity chunk
    decodes whole: n_ctx); default 512."""
    from nkat_gguf.engine.llama.runtime import RuntimeOptions

    return RuntimeOptions(n_ctx=n_ctx, n_batch=min(n_ctx, n_batch or 512), n_threads=threads,
                          n_gpu_layers=0 if no_cuda else gpu_layers, **extra)
