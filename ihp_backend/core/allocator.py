"""The memory allocator of a process that runs the network on the CPU (no torch import here:
gunicorn's config file calls this before a worker loads anything): jemalloc where installed
(``env_with_allocator``), else glibc's malloc tuned (``tune_malloc``).

A forward at 576 x 384 allocates and frees about 60 MB of activations. glibc returns freed
blocks of 128 KB and more to the kernel (``mmap`` / ``munmap``, heap trimming), and raises that
threshold on its own only in the process's main arena; the forward runs on a thread of its own
(``inference.TorchThread``), whose arena kept giving the memory back. So every forward faulted
about 14,000 fresh pages in again: 15-25 ms of a ~105 ms forward on this 2-core machine, 0 faults
and the same peak RSS with the settings below (``bench/malloc.py``)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8  # <malloc.h>
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
HEAP_MAX = 64 << 20  # the size of a thread arena's heaps on 64-bit
DEFAULT_KEEP_MB = 256  # IHP_MALLOC_KEEP_MB's default (settings.Settings)
ALLOCATORS = ("auto", "jemalloc", "glibc")  # IHP_ALLOCATOR
# jemalloc's options unless MALLOC_CONF is set (bench/malloc.py, docs/performance.md): one arena
# for all threads (a click's arrays are made on one request thread and freed on another), no
# separate arena for blocks of 8 MB and more, and freed pages kept for the next click instead of
# decayed back to the kernel (jemalloc's defaults faulted 8,000-13,000 pages in again per click),
# on transparent huge pages where the kernel allows them (madvise: ~5 faults per click instead of
# 1,000-2,000; -8 ms per 12 MP click, +25-70 MB peak)
JEMALLOC_CONF = "narenas:1,oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always"


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


JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def jemalloc_library(paths=JEMALLOC_PATHS) -> str | None:
    """The first jemalloc shared library found (Debian's ``libjemalloc2``), or None."""
    return next((p for p in paths if os.path.isfile(p)), None)


def preloaded_jemalloc(env) -> bool:
    """Whether ``env``'s LD_PRELOAD already loads a jemalloc."""
    return "jemalloc" in env.get("LD_PRELOAD", "")


def env_with_allocator(allocator: str, env, library: str | None = None) -> dict | None:
    """The environment to re-execute the server in so that ``allocator`` serves its mallocs, or None
    when ``env`` already has it. A worker that parses many photo sizes grows by ~200 MB under
    glibc (every new conv input shape leaves oneDNN primitives and freed blocks that glibc cannot
    hand back); jemalloc holds that to a fraction (docs/performance.md, bench/malloc.py).
    "auto" = jemalloc when the library is installed, else glibc (tuned by ``tune_malloc``);
    "jemalloc" without the library is a ValueError. jemalloc can only be loaded before the
    process starts (``LD_PRELOAD``), hence the re-execution; ``MALLOC_CONF`` is ``JEMALLOC_CONF``
    unless already set."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"IHP_ALLOCATOR must be one of {', '.join(ALLOCATORS)}, not {allocator!r}")
    if allocator == "glibc" or preloaded_jemalloc(env):
        return None
    library = library or jemalloc_library()
    if library is None:
        if allocator == "jemalloc":
            raise ValueError("IHP_ALLOCATOR=jemalloc but no libjemalloc.so.2 is installed "
                             "(Debian/Ubuntu: apt-get install libjemalloc2)")
        return None
    preload = " ".join(p for p in (library, env.get("LD_PRELOAD", "").strip()) if p)
    return dict(env, LD_PRELOAD=preload, MALLOC_CONF=env.get("MALLOC_CONF") or JEMALLOC_CONF)
