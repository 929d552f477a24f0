"""The few glibc malloc controls the project uses (inference keeping freed memory, the server's flat memory,
the benchmarks' allocator modes).

Elsewhere (musl, macOS) the functions are absent and callers change nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# `keep_freed_memory`'s settings: blocks up to 1 GiB come from the heap, and the heap is trimmed only beyond
# 2 GiB of free space at its top.
REUSE_MMAP_THRESHOLD = 2**30
REUSE_TRIM_THRESHOLD = 2**31 - 1


def libc_function(name: str):
    """A function of the C library (e.g. "mallopt", "malloc_trim"), or None where there is none."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of any size for reuse instead of unmapping them, process-wide.

    By default glibc gives a block of over 32 MiB back to the system when it is freed, so each inference
    allocates its large maps afresh and pays a page fault per 4 KiB page: ~15% of R50 inference at 800x1088
    on the benchmark machine, in kernel time. With these settings the pages are reused; the resident set
    stays at its high-water mark instead of falling between images. Thresholds the user set through
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are left alone. True when glibc took the settings,
    False where it is not the allocator (nothing changed).
    """
    return set_malloc_options(
        [
            (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", REUSE_MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", REUSE_TRIM_THRESHOLD),
        ]
    )


def set_malloc_options(options: list[tuple[int, str, int]]) -> bool:
    """mallopt(parameter, value) for each (parameter, environment variable, value), except where the user
    set that variable (glibc read it at start). True when glibc took them all; False where glibc is not
    the allocator (nothing changed)."""
    import os

    mallopt = libc_function("mallopt")
    if mallopt is None:  # not glibc (musl, macOS): nothing to tune
        return False
    ok = True
    for parameter, variable, value in options:
        if variable not in os.environ:
            ok &= mallopt(parameter, value) == 1
    return bool(ok)
