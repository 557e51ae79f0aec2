"""Keep freed memory in the process instead of handing it back to the kernel (glibc).

Every training step frees and re-allocates the same buffers: weight gradients,
activations, optimizer temporaries (about 10 MB per step for the 784-800-800-10
MLP at batch 64). By default glibc returns blocks over 128 KiB to the kernel
(munmap, heap trim), so each step faults the same pages back in and zeroes them:
~900 minor page faults per step there, about a tenth of a CPU step. Raising the
mmap and trim thresholds keeps those blocks in the heap for reuse: no faults after
the first step, and the process keeps its peak heap (it would anyway, next step).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("feedalign")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 << 20  # bytes: glibc's maximum; larger blocks (datasets) are still mmapped
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before trimming


def keep_freed_memory() -> bool:
    """Apply the thresholds; False (and nothing changed) where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: no mallopt
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the thresholds; allocation left as it was")
    return ok
