"""The CLI package's shape, checked from the source: every option name declared once, no module over 300 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nkat_gguf.cli import main

CLI = Path(__file__).resolve().parents[1] / "nkat_gguf" / "cli"
MAX_LINES = 300


def _long_names(node: ast.expr) -> list[str]:
    """`--name` strings an argument of a call spells: itself, or the items of a tuple or list."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)
            and i.value.startswith("--") and " " not in i.value]


def declared_option_names() -> Counter:
    """How many calls in the package declare each option name (click.option, the shared factory, aliases)."""
    counts: Counter = Counter()
    for path in CLI.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                args = list(node.args) + [k.value for k in node.keywords if k.arg != "help"]
                counts.update(name for arg in args for name in set(_long_names(arg)))
    return counts


def test_no_option_is_declared_twice() -> None:
    counts = declared_option_names()
    assert counts["--json"] == 1 and counts["--gamma"] == 1 and counts["--ctx"] == 1  # the check sees them
    assert {name: n for name, n in counts.items() if n > 1} == {}


def _commands(group: click.Group, ctx: click.Context) -> list[click.Command]:
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        found.append(command)
        if isinstance(command, click.Group):
            found += _commands(command, ctx)
    return found


def test_every_declared_option_is_used() -> None:
    """The count above means something only if the declarations are what the commands take."""
    used = {opt for command in _commands(main, click.Context(main)) for param in command.params
            for opt in param.opts if opt.startswith("--")}
    assert set(declared_option_names()) - {"--help", "--version"} <= used


def test_modules_are_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in CLI.glob("*.py")}
    assert len(sizes) >= 10 and max(sizes.values()) <= MAX_LINES, sizes


def test_old_spellings_still_parse_but_are_not_shown() -> None:
    runner = CliRunner()
    assert "--theta-gamma" not in runner.invoke(main, ["convert", "--help"]).output
    bad = runner.invoke(main, ["convert", "-o", "x.gguf", "--theta-gamma", "-1"])
    assert bad.exit_code == 2 and "--theta-gamma" in bad.output
    qc_help = runner.invoke(main, ["qc", "--help"]).output
    assert "confidence" in qc_help and "calibration  " not in qc_help
    assert runner.invoke(main, ["qc", "calibration", "--help"]).output.startswith("Usage: main qc calibration")


@pytest.mark.parametrize("command", [[], ["convert"], ["export", "adapter"]])
def test_help_does_not_load_llama_cpp(command: list[str]) -> None:
    """--help (choices and ranges included) is built from light modules: llama.cpp loads only to run a command."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "nkat_gguf.cli", *command, "--help"],
                         capture_output=True, text=True, check=True)
    imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
    assert "nkat_gguf.cli" in imported  # the check sees the imports
    assert not [name for name in imported if name.split(".")[0] == "llama_cpp"]


def _command(path: list[str]) -> click.Command:
    command: click.Command = main
    for name in path:
        command = command.get_command(click.Context(command), name)  # type: ignore[attr-defined]
    return command


@pytest.mark.parametrize("path, old, new, value, required", [
    (["convert"], "--theta-gamma", "--gamma", "0.5", ["-o", "x.gguf"]),
    (["convert"], "--op-budget", "--theta-weights", "0", ["-o", "x.gguf"]),
    (["convert"], "--theta-max-weights", "--theta-weights", "30", ["-o", "x.gguf"]),
    (["optimize"], "--max-weights", "--theta-weights", "0,15", ["-o", "d"]),
    (["optimize"], "--budgets", "--theta-budget", "1%,3%", ["-o", "d"]),
    (["perplexity"], "--kld-reference", "--kld-base-model", __file__, []),
])
def test_each_old_spelling_is_a_hidden_alias_of_the_new_one(path: list[str], old: str, new: str, value: str,
                                                            required: list[str]) -> None:
    """An old spelling gives the parameter the new one gives, and --help lists only the new one."""
    command = _command(path)
    parsed = {spelling: command.make_context(path[-1], [*required, spelling, value]).params
              for spelling in (old, new)}
    assert parsed[old] == parsed[new]
    param = next(p for p in command.params if new in p.opts)
    assert parsed[new][param.name] not in (None, "", ())  # the value arrived
    shown = CliRunner().invoke(main, [*path, "--help"]).output
    assert new in shown and old not in shown
