"""The few glibc malloc controls the project uses (the server's flat memory, the benchmarks' allocator modes).

Elsewhere (musl, macOS) the functions are absent and callers change nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def libc_function(name: str):
    """A function of the C library (e.g. "mallopt", "malloc_trim"), or None where there is none."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
