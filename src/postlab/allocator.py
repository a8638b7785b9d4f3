"""The C allocator of a CPU training process: keep freed memory for reuse instead of returning it.

glibc's malloc serves blocks above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps
them on free, and trims the top of its heap when much of it is free. A training step allocates and
frees the same large buffers every time (the 113 MB fp32 gradient of the 135M model's tied
embedding, its sum with the head's; activations), so every step faults them in again, one zeroed
4 KB page at a time: on a 2-core VM with AMX 14% of an SFT step, and about half of all page faults
of a stage. Telling malloc never to mmap and never to trim makes the second step reuse the first
step's memory (bench/allocator.py). A process that trains many runs one after another would keep
the fragments of every earlier one (its peak grew 4.6 -> 5.8 GB over ten short stages); so after each
run `release_freed_memory` hands what is free back to the system (malloc_trim), and the peak stays
below glibc's default (bench/allocator.py --sequence).

What PyTorch's CPU tuning guides do with jemalloc or tcmalloc through LD_PRELOAD, here without a
preload. Leaves malloc alone when the C library is not glibc, when the user has set glibc's own
MALLOC_* tunables, or when POSTLAB_KEEP_FREED_MEMORY=0.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import platform

log = logging.getLogger("postlab")

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_USER_TUNABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_applied: bool | None = None
_libc = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in this process (see the module's docstring); returns
    whether it now does. Idempotent, process-wide."""
    global _applied, _libc
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("POSTLAB_KEEP_FREED_MEMORY", "1") == "0" or any(k in os.environ for k in _USER_TUNABLES):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # mallopt returns 1 on success; a trim threshold of -1 disables trimming (man mallopt)
        _applied = bool(_libc.mallopt(_M_MMAP_MAX, 0)) and bool(_libc.mallopt(_M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):
        return False
    if _applied:
        log.debug("malloc keeps freed memory (no mmap, no trim)")
    return _applied


def release_freed_memory() -> None:
    """Hand the memory this process has freed back to the system (glibc's malloc_trim), where
    keep_freed_memory applies; called after each run."""
    if _applied:
        gc.collect()  # a model's reference cycles, so that its tensors are free first
        _libc.malloc_trim(0)
