"""convert's peak resident memory by the formula of docs/CALIBRATION.md "Memory", and the `--max-memory` check.

The terms come from the model's tensor shapes, so the check runs before any work: a limit the formula
exceeds is refused in one line with what the run needs, and nothing is written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from dataclasses import dataclass

from nkat_gguf.convert.moment_groups import layer_groups, parse_memory
from nkat_gguf.engine.calibrate.calibration import MAX_SECOND_MOMENT_WIDTH, WINDOW
from nkat_gguf.errors import InputError
from nkat_gguf.format.gguf_file import GGUFLayout
from nkat_gguf.format.imatrix import NEVER_RECORDED, input_widths

PROCESS_BYTES = 256 << 20  # the interpreter with numpy, torch and llama.cpp loaded (about 234 MiB here)
FIT_BYTES_PER_ELEMENT = 32  # W_ref, the weight at its type, the residual (float32), E·L and its float64 source
MMAP_THRESHOLD = 128 << 10  # glibc's default, fixed: arrays above it are mapped alone and unmapped when freed
_M_MMAP_THRESHOLD = -3  # malloc.h; setting it also stops glibc's dynamic raise of the threshold
SHARED_INPUT = re.compile(r"\.(attn_k|attn_v|ffn_up)\.")  # these read the input of attn_q / ffn_gate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each term; `peak` is their combination (docs/CALIBRATION.md)."""

    file: int  # M: the model file llama.cpp maps and touches (calibration, quantization, sensitivity)
    statistics: int  # S_g: the Σxxᵀ of one group of layers while it is collected, and its per-width buffers
    working_set: int  # W: one weight's fit (and its Cholesky factor)
    factors: int  # F: every weight's θ factors, held until the allocation cuts them
    runtime: int  # R: llama.cpp's logits for one window (calibration and sensitivity evaluate every position)

    @property
    def peak(self) -> int:
        return PROCESS_BYTES + self.file + max(self.statistics, self.working_set + self.factors) + self.runtime

    def describe(self) -> str:
        mib = 1 << 20
        return (f"file {self.file / mib:.0f} MiB + max(statistics {self.statistics / mib:.0f} MiB, one weight's fit "
                f"{self.working_set / mib:.0f} MiB + θ factors {self.factors / mib:.0f} MiB) + logits "
                f"{self.runtime / mib:.0f} MiB + process {PROCESS_BYTES / mib:.0f} MiB")


def estimate(layout: GGUFLayout, file_bytes: int, names: list[str], calib_memory: int, second_moments: bool,
             factor_rank: int, calibrates: bool) -> MemoryEstimate:
    """The formula's terms for this model. `factor_rank`: the rank every weight is fitted at before any cut
    (an allocation's ALLOCATION_MAX_RANK, else --theta-rank); `calibrates`: llama.cpp evaluates windows."""
    shapes = {t.name: t.shape for t in layout.tensors}
    recorded = set(input_widths(layout)) - NEVER_RECORDED
    distinct = {n: 4 * shapes[n][0] ** 2 for n in recorded
                if shapes[n][0] <= MAX_SECOND_MOMENT_WIDTH and not SHARED_INPUT.search(n)}
    statistics = 0
    if second_moments:
        groups = layer_groups(layout, recorded, calib_memory)
        statistics = (max(sum(distinct.get(n, 0) for n in group) for group in groups)
                      + sum(4 * w * w for w in {shapes[n][0] for n in distinct}))  # + one xᵀx buffer per width
    widest = max((shapes[n][0] for n in names if shapes[n][0] <= MAX_SECOND_MOMENT_WIDTH), default=0)
    largest = max((shapes[n][0] * shapes[n][1] for n in names), default=0)
    working = FIT_BYTES_PER_ELEMENT * largest + (24 * widest * widest if second_moments else 0)
    factors = 4 * factor_rank * sum(shapes[n][0] + shapes[n][1] for n in names)
    vocab = shapes["token_embd.weight"][1] if "token_embd.weight" in shapes else 0
    return MemoryEstimate(file_bytes, statistics, working, factors, 4 * vocab * WINDOW if calibrates else 0)


def check_max_memory(limit: str | None, needed: MemoryEstimate) -> None:
    """`--max-memory SIZE`: refuse, in one line naming what the run needs, a run the formula puts above it."""
    if limit is None:
        return
    if needed.peak > parse_memory(limit, "--max-memory"):
        raise InputError(f"convert needs about {needed.peak / (1 << 30):.2f} GiB of memory ({needed.describe()}), "
                         f"more than --max-memory {limit}")


def return_freed_memory() -> None:
    """Make glibc give every freed large array back to the system (Linux with glibc; elsewhere nothing).

    glibc raises its mmap threshold each time a mapped block is freed, up to 32 MiB, so after the first weights
    the per-weight arrays (residuals, factors, quantized rows) come from the heap, and freed heap is rarely
    returned: on a 16-layer synthetic model the peak grew by twice the file's growth over a 4-layer one
    (684 MiB against 598), by less than the file's growth with the threshold fixed (495 against 471).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to set
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
