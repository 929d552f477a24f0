"""Keep a long-running server's resident memory flat (glibc only; elsewhere nothing is changed).

glibc raises its mmap threshold each time a large block is freed, after which big tensors come from the heap
and their pages stay resident once freed; and each of the many request threads may get its own arena. Both
make RSS creep with the number of requests served. A fixed threshold returns large blocks to the system
when freed, and two arenas bound the fragmentation. The same as starting the process with
MALLOC_MMAP_THRESHOLD_=262144 MALLOC_ARENA_MAX=2; values given in those variables are left alone.
Freed small blocks still keep their pages until the heap is trimmed: `HeapTrimmer` does that now and then.
"""

from __future__ import annotations

import threading
import time

from mask2former.glibc import M_ARENA_MAX, M_MMAP_THRESHOLD, libc_function, set_malloc_options

MMAP_THRESHOLD_BYTES = 256 * 1024
ARENA_MAX = 2


def limit_heap_growth() -> bool:
    """Apply the two malloc settings; True when glibc accepted them."""
    return set_malloc_options(
        [
            (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD_BYTES),
            (M_ARENA_MAX, "MALLOC_ARENA_MAX", ARENA_MAX),
        ]
    )


class HeapTrimmer:
    """Calls glibc's malloc_trim(0) (gives free heap pages back to the system) at most every `interval_s`.

    Thread-safe; `maybe_trim()` is cheap when it is not yet time. Does nothing without glibc.
    """

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self._malloc_trim = libc_function("malloc_trim")
        self._lock = threading.Lock()
        self._last = time.monotonic()

    def maybe_trim(self) -> None:
        if self._malloc_trim is None:
            return
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                return
            self._last = now
        self._malloc_trim(0)
