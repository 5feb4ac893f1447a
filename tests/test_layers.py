"""The layout's rules, checked from the source so they stay true (README, "Layout").

Layers, lowest first; a module may import its own layer and the layers below it, never above:
  base      nkat_gguf (version), errors, texts, timing, default_model, format/, math/
  runtime   engine/llama/ (the llama.cpp runtime), engine/forward/ (the PyTorch forward); engine/ installs as
            nkat_gguf.engine
  engine    engine/measure/, engine/calibrate/, engine/serve/: one room per job, each on the runtime, none on another
  steps     so8t/, export/: pipelines' building blocks on top of the engine; SO8T is one package (its rotations,
            checkpoints, options and their checks included), and convert reaches it only through the package's names
  convert   convert/: the convert pipeline
  drivers   evaluate/, optimizer/ (installed as nkat_gguf.optimizer): runs of convert plus measurement
  front     cli/ (one module per command group), doctor, backends
Also: no import cycle between modules at all; project imports at the top of modules (the CLI alone
package imports each command's modules when the command runs); every `nkat.*` key string in one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"nkat_gguf": ROOT / "nkat_gguf", "nkat_gguf.engine": ROOT / "engine",
           "nkat_gguf.optimizer": ROOT / "optimizer"}
LAYERS = [
    ("base", ("nkat_gguf", "nkat_gguf.errors", "nkat_gguf.texts", "nkat_gguf.timing", "nkat_gguf.default_model",
              "nkat_gguf.format", "nkat_gguf.math")),
    ("runtime", ("nkat_gguf.engine.llama", "nkat_gguf.engine.forward")),
    ("engine", ("nkat_gguf.engine",)),
    ("steps", ("nkat_gguf.so8t", "nkat_gguf.export")),
    ("convert", ("nkat_gguf.convert",)),
    ("drivers", ("nkat_gguf.evaluate", "nkat_gguf.optimizer")),
    ("front", ("nkat_gguf.cli", "nkat_gguf.doctor", "nkat_gguf.backends")),
]
LAZY_IMPORTS_ALLOWED = "nkat_gguf.cli"  # the CLI package: each command imports its library when it runs
KEY_OWNER = "nkat_gguf.format.nkat"
SO8T = "nkat_gguf.so8t"  # convert imports only the package's own names (options, their check, the bake step)
ENGINE_JOBS = ("nkat_gguf.engine.measure", "nkat_gguf.engine.calibrate", "nkat_gguf.engine.serve")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def layer_of(module: str) -> int:
    best = max((prefix for _, prefixes in LAYERS for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(i for i, (_, prefixes) in enumerate(LAYERS) if best in prefixes)


def project_module(name: str) -> str | None:
    """The project module an import names (a `from pkg import submodule` names the submodule)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported project module, at module level) for every import statement of `module`."""
    tree = ast.parse(MODULES[module].read_text())
    top_level = {id(node) for node in tree.body}
    is_package = MODULES[module].name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        targets = {t for t in (project_module(n) for n in names) if t and t != module}
        found += [(t, id(node) in top_level) for t in sorted(targets)]
    return found


def test_sources_are_found() -> None:
    assert {"nkat_gguf.cli", "nkat_gguf.cli.options", "nkat_gguf.cli.convert", "nkat_gguf.engine.llama.runtime", "nkat_gguf.optimizer.study",
            "nkat_gguf.format.nkat"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_layer_above(module: str) -> None:
    mine = layer_of(module)
    upward = [(target, LAYERS[layer_of(target)][0]) for target, _ in imports(module) if layer_of(target) > mine]
    assert not upward, f"{module} ({LAYERS[mine][0]}) imports from above: {upward}"


def room_of(module: str) -> str | None:
    return next((room for room in ENGINE_JOBS if module == room or module.startswith(room + ".")), None)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room_of(m)))
def test_engine_rooms_do_not_import_each_other(module: str) -> None:
    other = [t for t, _ in imports(module) if room_of(t) not in (None, room_of(module))]
    assert not other, f"{module} imports another engine room: {other}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("nkat_gguf.convert")))
def test_convert_reaches_so8t_only_through_its_package(module: str) -> None:
    inside = [t for t, _ in imports(module) if t.startswith(SO8T + ".")]
    assert not inside, f"{module} imports SO8T's modules {inside}; import their names from {SO8T}"


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _ in imports(m)} for m in MODULES}
    # packages import their own submodules to re-export them; a submodule importing a sibling goes through
    # the package, which is no cycle of code
    for package in [m for m in MODULES if MODULES[m].name == "__init__.py"]:
        graph[package] = {t for t in graph[package] if not t.startswith(package + ".")}
        for m in graph:
            if m.startswith(package + "."):
                graph[m].discard(package)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if nxt not in state and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    assert not any(visit(m, []) for m in sorted(MODULES) if m not in state), f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES
                                         if m != LAZY_IMPORTS_ALLOWED and not m.startswith(LAZY_IMPORTS_ALLOWED + ".")))
def test_project_imports_are_at_the_top(module: str) -> None:
    lazy = [target for target, top in imports(module) if not top]
    assert not lazy, f"{module} imports {lazy} inside a function; only the CLI imports lazily"


def _key_strings(tree: ast.AST) -> list[str]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and node.value.startswith("nkat.")]


def test_every_nkat_key_string_is_in_the_format_module() -> None:
    elsewhere = {m: keys for m in MODULES if m != KEY_OWNER
                 if (keys := _key_strings(ast.parse(MODULES[m].read_text())))}
    assert not elsewhere, f"nkat.* keys outside {KEY_OWNER}: {elsewhere}"
    assert len(_key_strings(ast.parse(MODULES[KEY_OWNER].read_text()))) > 10  # the check sees the owner's keys
