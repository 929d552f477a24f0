"""Keep a long-running server's resident memory flat (glibc only; elsewhere nothing is changed).

glibc raises its mmap threshold each time a large block is freed, after which big tensors come from the heap
and their pages stay resident once freed; and each of the many request threads may get its own arena. Both
make RSS creep with the number of requests served. A fixed threshold returns large blocks to the system
when freed, and two arenas bound the fragmentation. The same as starting the process with
MALLOC_MMAP_THRESHOLD_=262144 MALLOC_ARENA_MAX=2; values given in those variables are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt parameters of glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 256 * 1024
ARENA_MAX = 2


def limit_heap_growth() -> bool:
    """Apply the two malloc settings; True when glibc accepted them."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok &= mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    if "MALLOC_ARENA_MAX" not in os.environ:
        ok &= mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    return bool(ok)
