"""Keep freed heap memory for reuse: for processes that stream MiB-sized gRPC messages.

Each message a process receives over gRPC passes through buffers of its size that are freed
as soon as it is handed over. With glibc's default thresholds those pages go back to the
kernel at once (a block of 128 KiB or more is mapped and unmapped on its own until glibc
adapts, and a heap is trimmed once twice that is free at its top), and the next message
faults them in again: a process reading a port-forward stream took about 150,000 page
faults per GiB, and half its CPU went to them. With the thresholds below it took 10,000 to
30,000. The cost: each heap (glibc keeps one per thread allocating at the same time, at most
eight a core) may hold up to TRIM_THRESHOLD of freed memory.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # stream messages (2 MiB) and gRPC's read buffers come from the heap
TRIM_THRESHOLD = 16 << 20  # a heap keeps up to this much free at its top


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where the C
    library has no `mallopt` (not glibc) or refuses."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
