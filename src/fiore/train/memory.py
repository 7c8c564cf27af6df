"""Process memory settings for training on CPU.

Why: a training step allocates and frees the same large activations every step. glibc serves any block above its
mmap threshold (at most 32 MB) with fresh pages from the kernel and returns them on free, and trims freed memory at
the top of its heap, so every step page-faults its activations in again: zero-filling them costs as much as the
arithmetic on them. Keeping freed memory in the process, as PyTorch's CUDA caching allocator or jemalloc/tcmalloc
would, makes a training step faster for fiore and transformers alike (measurements: docs/performance.md;
`python benchmarks/bench_train.py --allocator both`). The cost: peak memory is not returned to the OS until the
process ends, which is what a training process wants anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and never trim it. Returns True when applied.

    A no-op (False) off Linux/glibc, or when the environment variable FIORE_KEEP_FREED_MEMORY is "0".
    """
    global _done
    if _done:
        return True
    if os.environ.get("FIORE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
