"""glibc malloc settings for a process that runs the network on the CPU (no torch import here:
gunicorn's config file calls this before a worker loads anything).

A forward at 576 x 384 allocates and frees about 60 MB of activations. glibc returns freed
blocks of 128 KB and more to the kernel (``mmap`` / ``munmap``, heap trimming), and raises that
threshold on its own only in the process's main arena; the forward runs on a thread of its own
(``inference.TorchThread``), whose arena kept giving the memory back. So every forward faulted
about 14,000 fresh pages in again: 15-25 ms of a ~105 ms forward on this 2-core machine, 0 faults
and the same peak RSS with the settings below (``bench/malloc.py``)."""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8  # <malloc.h>
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
HEAP_MAX = 64 << 20  # the size of a thread arena's heaps on 64-bit
DEFAULT_KEEP_MB = 256  # IHP_MALLOC_KEEP_MB's default (settings.Settings)


def tune_malloc(arenas: int = 0, keep_mb: int = DEFAULT_KEEP_MB) -> bool:
    """Keep freed memory for reuse instead of handing it back to the kernel after each forward:
    blocks under 32 MB come from the heap (``M_MMAP_THRESHOLD``), up to ``keep_mb`` MB of free
    memory at a heap's top stays mapped (``M_TRIM_THRESHOLD``), and a thread arena's heap that
    falls empty is kept (``M_TOP_PAD`` of one heap: without it the torch thread's arena still
    deleted a 64 MB heap and faulted it in again on some clicks); ``arenas`` > 0 also caps
    the malloc arenas (``M_ARENA_MAX``; call it before other threads start). ``keep_mb`` 0 leaves
    glibc's own thresholds. Peak RSS is unchanged (the pages were needed anyway); the resident
    size between requests stays near the peak. Returns False where the C library is not glibc
    (musl, macOS: nothing done)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = True
    if arenas > 0:
        ok &= mallopt(M_ARENA_MAX, int(arenas)) == 1
    if keep_mb > 0:
        # setting either threshold turns off glibc's dynamic adjustment of both: set both
        ok &= mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
        ok &= mallopt(M_TRIM_THRESHOLD, int(keep_mb) << 20) == 1
        ok &= mallopt(M_TOP_PAD, HEAP_MAX) == 1  # address space only: pages count once touched
    return bool(ok)
