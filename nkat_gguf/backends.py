"""Which runtimes can run an NKAT model on this machine, and the exact commands that run it with theta at γ.

Detection only looks: it imports llama_cpp and runs `NAME --version` (with a timeout) for binaries
on PATH. Each backend's commands are argv lists; `launch` runs exactly those, in order, so what is
printed is what runs. Runtimes that apply an adapter at scale 1 (llama.cpp's --lora, Ollama,
KoboldCpp) get a γ-folded adapter written by `nkat-gguf export` first.

Usage: nkat-gguf backends [MODEL] [--gamma G] [--launch NAME]   (or python tools/backend_selector.py ...)
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nkat_gguf.engine.llama.adapter import adapter_cache_dir
from nkat_gguf.errors import InputError
from nkat_gguf.export.targets import ADAPTER, KOBOLD, MODELFILE, OLLAMA, export_stem, kcpps_name, ollama_name
from nkat_gguf.format.nkat import check_gamma, read_theta

VERSION_TIMEOUT_S = 20
BINARIES = {  # backend -> executable names looked up on PATH, first found wins
    "llama-cli": ("llama-cli",),
    "llama-server": ("llama-server",),
    "koboldcpp": ("koboldcpp", "koboldcpp.py", "koboldcpp-linux-x64"),
    "ollama": ("ollama",),
}
SERVER_PORTS = {"llama-server": 8080}


@dataclass
class Backend:
    name: str
    installed: bool
    version: str | None = None
    location: str | None = None
    detail: str = ""
    commands: list[list[str]] = field(default_factory=list)  # empty without a model

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Target:
    """The model to run and the γ to run it at (None: the model has no theta)."""

    model: Path
    gamma: float | None
    exports: Path  # where the exports the commands need are written


def _version_line(output: str) -> str | None:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    with_version = [line for line in lines if "version" in line.lower() and re.search(r"\d", line)]
    return (with_version or lines or [None])[0]


def _probe(executable: str) -> str | None:
    """`EXE --version`, first telling line of stdout+stderr; None if it does not answer in time."""
    try:
        done = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _version_line(done.stdout + "\n" + done.stderr)


def _llama_cpp_python() -> Backend:
    try:
        import llama_cpp
    except ImportError:
        return Backend("llama-cpp-python", False, detail="pip install llama-cpp-python==0.3.36")
    adapter_api = all(hasattr(llama_cpp, f) for f in ("llama_adapter_lora_init", "llama_set_adapters_lora"))
    detail = ("adapter API: yes (theta at any gamma without reloading)" if adapter_api
              else "adapter API: missing (upgrade llama-cpp-python)")
    return Backend("llama-cpp-python", True, llama_cpp.__version__, str(Path(llama_cpp.__file__).parent), detail)


def _binary(name: str) -> Backend:
    for executable in BINARIES[name]:
        location = shutil.which(executable)
        if location:
            return Backend(name, True, _probe(location), location)
    return Backend(name, False, detail=f"not found on PATH (looked for {', '.join(BINARIES[name])})")


def nkat_command() -> list[str]:
    """This tool's CLI: the `nkat-gguf` on PATH, else this interpreter running its module."""
    found = shutil.which("nkat-gguf")
    return [found] if found else [sys.executable, "-m", "nkat_gguf.cli"]


def _gamma_args(target: Target) -> list[str]:
    return [] if target.gamma is None else ["--gamma", f"{target.gamma:g}"]


def commands_for(backend: Backend, target: Target) -> list[list[str]]:
    """The argv lists that run `target` on `backend`, preparation (exports) first."""
    model, nkat, stem = str(target.model), nkat_command(), export_stem(target.model)
    directory = target.exports / backend.name
    exe = backend.location or backend.name
    if backend.name == "llama-cpp-python":
        return [nkat + ["serve", model] + _gamma_args(target)]
    if backend.name in ("llama-cli", "llama-server"):
        serve = ["--host", "127.0.0.1", "--port", str(SERVER_PORTS[backend.name])] if backend.name == "llama-server" else []
        if target.gamma is None:
            return [[exe, "-m", model] + serve]
        adapter = str(directory / f"{stem}.theta-g{target.gamma:g}.gguf")
        return [nkat + ["export", ADAPTER, model, "-o", adapter] + _gamma_args(target),
                [exe, "-m", model, "--lora", adapter] + serve]
    if backend.name == "koboldcpp":
        return [nkat + ["export", KOBOLD, model, "--output-dir", str(directory)] + _gamma_args(target),
                [exe, "--config", str(directory / kcpps_name(target.model))]]
    if backend.name == "ollama":
        name = ollama_name(target.model)
        return [nkat + ["export", OLLAMA, model, "--output-dir", str(directory), "--name", name] + _gamma_args(target),
                [exe, "create", name, "-f", str(directory / MODELFILE)], [exe, "run", name]]
    raise ValueError(f"unknown backend {backend.name}")


def resolve_target(model: Path, gamma: float | None, exports: Path | None = None) -> Target:
    """γ: the given one, else the file's; None when the model carries no theta."""
    theta = read_theta(model)
    has_theta = theta is not None and bool(theta.tensors)
    if gamma is not None:
        check_gamma(gamma)
    resolved = (theta.gamma if gamma is None else gamma) if has_theta else None
    if resolved is not None:
        resolved = float(f"{resolved:.6g}")  # the float32 stored in the file, as a person writes it
    return Target(model.resolve(), resolved, exports or adapter_cache_dir().parent / "exports")


def detect(target: Target | None = None) -> list[Backend]:
    """Every known backend, installed or not; with a target, the commands of the installed ones."""
    backends = [_llama_cpp_python()] + [_binary(name) for name in BINARIES]
    if target is not None:
        for backend in backends:
            if backend.installed and not backend.detail.startswith("adapter API: missing"):
                backend.commands = commands_for(backend, target)
    return backends


def format_backends(backends: list[Backend], target: Target | None) -> str:
    lines = []
    for b in backends:
        status = f"{b.version or 'version unknown'}  ({b.location})" if b.installed else "not installed:"
        lines.append(f"{b.name:17} {status}" + (f"  {b.detail}" if b.detail else ""))
        lines += [f"    $ {shlex.join(c)}" for c in b.commands]
    if target is not None:
        what = "without theta (none in the file)" if target.gamma is None else f"with theta at gamma {target.gamma:g}"
        lines.insert(0, f"commands run {target.model.name} {what}:")
    else:
        lines.append("give a MODEL to see the command for each")
    return "\n".join(lines)


def launch(backends: list[Backend], name: str) -> int:
    """Run the named backend's commands in order; returns the exit code of the last (the runtime itself)."""
    chosen = next((b for b in backends if b.name == name), None)
    if chosen is None:
        raise InputError(f"unknown backend {name!r}; choose one of: {', '.join(b.name for b in backends)}")
    if not chosen.installed:
        raise InputError(f"{name} is not installed here ({chosen.detail})")
    if not chosen.commands:
        raise InputError(f"--launch {name} needs a MODEL")
    *preparation, run = chosen.commands
    for command in preparation:
        if subprocess.run(command).returncode != 0:
            raise InputError(f"preparing {name} failed: {shlex.join(command)}")
    return subprocess.run(run).returncode


