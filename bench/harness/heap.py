"""Give freed heap memory back to the operating system between a streaming cell's batches.

glibc's malloc raises its mmap threshold after the first large block is freed (dynamically, up to 32 MiB on 64-bit
Linux; mallopt(3), M_MMAP_THRESHOLD). From then on a cell's per-batch buffers (a 50 x 3 x 256 x 256 float32 batch is
39 MB; its uint8 copy, its float16 FP shard, the Inception input) are carved from the heap arenas, and the pages
they leave when freed stay in the process's resident set: with every live tensor flat, an LSUN-shaped RTN cell's
RSS grew by ~27 MB per batch (1100 samples, batch 50). malloc_trim(0) after each batch returns those free pages
(both at the top of each arena and, since glibc 2.8, inside it), and RSS stays flat; it walks the free lists only,
milliseconds against a batch's seconds.

Elsewhere (macOS, musl, Windows) there is no malloc_trim and `release_freed` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_freed() -> bool:
    """Return the heap's free pages to the OS (glibc malloc_trim(0)). True when it ran, False where unavailable."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
