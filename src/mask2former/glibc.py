"""The few glibc malloc controls the project uses (inference keeping freed memory, the server's flat memory,
the benchmarks' allocator modes).

Elsewhere (musl, macOS) the functions are absent and callers change nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# `keep_freed_memory`'s settings: blocks up to 1 GiB come from the heap, and the heap is trimmed only beyond
# 2 GiB of free space at its top.
REUSE_MMAP_THRESHOLD = 2**30
REUSE_TRIM_THRESHOLD = 2**31 - 1
# Where glibc's own dynamic thresholds settle once large blocks have been freed (DEFAULT_MMAP_THRESHOLD_MAX on
# 64-bit, and twice that for trimming): the mmap threshold is what `freed_memory_kept` returns to.
SETTLED_MMAP_THRESHOLD = 32 * 2**20
SETTLED_TRIM_THRESHOLD = 64 * 2**20


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
    allocates its large maps afresh and pays a page fault per 4 KiB page: ~15% of R50 inference at 800x1088 on
    the benchmark machine, in kernel time. With these settings the pages are reused; the resident set stays at
    its high-water mark instead of falling between images (see `freed_memory_kept` for a block). Thresholds
    the user set through MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are left alone. True when glibc took
    the settings, False where it is not the allocator (nothing changed).
    """
    return set_malloc_options(
        [
            (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", REUSE_MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", REUSE_TRIM_THRESHOLD),
        ]
    )


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True) -> Iterator[None]:
    """`keep_freed_memory()` inside the block (when `enabled`); after it, blocks over glibc's settled mmap
    threshold are mapped and unmapped again, while the heap stays untrimmed.

    For the model's forward pass, which allocates the same large maps image after image. What follows it
    (the post-processing of a 4000x4000 photo, with large blocks of other sizes) gets those blocks from
    mmap, so it neither fragments nor grows the heap; the heap keeps the forward pass's pages, so the next
    image's forward pass does not fault them in again, whatever ran in between (post-processing, another
    model). The resident set stays near the forward pass's peak, as `keep_freed_memory` says.
    """
    if not enabled:
        yield
        return
    keep_freed_memory()
    try:
        yield
    finally:
        set_malloc_options([(M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", SETTLED_MMAP_THRESHOLD)])


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
