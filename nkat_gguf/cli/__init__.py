"""`nkat-gguf` command line: thin shells that parse options, call one library function, print text or JSON.

One module per command group; `options` declares every shared option once; `errors` turns the library's
typed errors into one line. Nothing here does math or file formats; each command imports the library
when it runs, so `--help` loads no llama.cpp.
"""

from __future__ import annotations

import click

from nkat_gguf import __version__
from nkat_gguf.cli.convert import convert
from nkat_gguf.cli.deploy import backends, export, serve
from nkat_gguf.cli.doctor import doctor
from nkat_gguf.cli.errors import OneLineErrors
from nkat_gguf.cli.evaluate import frontier, quality
from nkat_gguf.cli.measure import bench, compare, perplexity
from nkat_gguf.cli.optimize import optimize
from nkat_gguf.cli.qc import qc
from nkat_gguf.cli.so8t import so8t

__all__ = ["main"]


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nkat-gguf")
def main() -> None:
    """Convert GGUF models to NKAT GGUF (a low-rank quantization correction, theta, stored in metadata)
    and run, measure and tune them with llama.cpp.

    \b
    Typical use:
      nkat-gguf convert --input model.gguf --outtype Q4_0 --output model.nkat.gguf
      nkat-gguf compare --model model.nkat.gguf
    """


for _command in (convert, perplexity, bench, compare, quality, frontier, qc, so8t, export, backends, serve, optimize,
                 doctor):
    main.add_command(_command)
