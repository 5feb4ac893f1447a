"""Which instruction sets this llama.cpp build uses, and which the CPU has that it leaves unused.

llama.cpp's system info lists the CPU features its ggml kernels were *compiled* for (`AVX2 = 1 | ...`).
A wheel built on one machine and reused on another (pip caches wheels without keying on the CPU) can
miss instructions the new CPU has, which costs speed, or use some it lacks, which crashes with an
illegal instruction. The CPU's own list comes from /proc/cpuinfo (Linux); elsewhere it is unknown.

Pure functions of llama.cpp's system info line (`llama_cpp.llama_print_system_info()`, or the line a
stock tool logs), so `doctor` can still report a llama-cpp-python that fails to import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# /proc/cpuinfo flag -> the name llama.cpp's system info prints (ggml-cpu.cpp, ggml_backend_cpu_get_features)
CPU_FLAG_TO_FEATURE = {
    # x86 ("flags")
    "pni": "SSE3", "ssse3": "SSSE3", "avx": "AVX", "avx_vnni": "AVX_VNNI", "avx2": "AVX2", "f16c": "F16C",
    "fma": "FMA", "bmi2": "BMI2", "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16", "amx_int8": "AMX_INT8",
    # Arm ("Features")
    "asimd": "NEON", "asimdhp": "FP16_VA", "asimddp": "DOTPROD", "i8mm": "MATMUL_INT8", "sve": "SVE", "sme": "SME",
}


@dataclass(frozen=True)
class BuildFeatures:
    system_info: str  # llama.cpp's own line, verbatim
    built: tuple[str, ...]  # instruction sets and options the build reports as 1 (AVX2, OPENMP, ...)
    cpu: tuple[str, ...] | None  # the CPU's, in llama.cpp's names; None where /proc/cpuinfo is unavailable
    unused: tuple[str, ...]  # what the CPU has and the build does not use

    def as_dict(self) -> dict:
        return {"system_info": self.system_info, "built": list(self.built),
                "cpu": None if self.cpu is None else list(self.cpu), "unused": list(self.unused)}


def parse_system_info(system_info: str) -> tuple[str, ...]:
    """Every `NAME = 1` of llama.cpp's system info, in its order."""
    return tuple(m.group(1) for m in re.finditer(r"(\w+) = 1\b", system_info))


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first CPU's flags ("flags" on x86, "Features" on Arm), or None where there is no cpuinfo."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else None


def build_features(system_info: str, flags: set[str] | None = None) -> BuildFeatures:
    """A llama.cpp build (its system info line) against this CPU, or against the given CPU flags."""
    system_info = system_info.strip()
    flags = cpu_flags() if flags is None else flags
    built = parse_system_info(system_info)
    cpu = None if flags is None else tuple(f for flag, f in CPU_FLAG_TO_FEATURE.items() if flag in flags)
    unused = () if cpu is None else tuple(f for f in cpu if f not in built)
    return BuildFeatures(system_info, built, cpu, unused)
