"""Large heap blocks straight back to the system when freed: what keeps the server's size steady.

glibc's malloc gives each thread an arena and, once a block it allocated with mmap is freed, raises its
mmap threshold to that block's size (and its trim threshold to twice that), so later blocks of that size
come from the arenas and stay there after they are freed; `malloc_trim` does not return the top of a
thread's arena either. A server reading multi-megabyte bodies (uvicorn's growing buffer, the bytes, the
parsed str) then grows with waves of such requests: without this cap, tests/test_server_load.py's second
wave mostly ends past its tolerance on resident size. Fixing the threshold with `mallopt` turns the
adjustment off: blocks of at least `threshold` bytes are mapped and unmapped, smaller ones are served as
before. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def map_large_blocks(threshold: int) -> bool:
    """Make this process's malloc map every block of `threshold` bytes or more; False where it cannot."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    except OSError:
        return False
    # the trim threshold too: the adjustments before this call may have raised it far above `threshold`
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1 == mallopt(M_TRIM_THRESHOLD, threshold)
