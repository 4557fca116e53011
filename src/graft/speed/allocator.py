"""glibc's malloc, told to keep and reuse freed memory for large tensors.

Above glibc's mmap threshold (128 KB, adapting up to 32 MB) every allocation gets fresh pages from
the kernel and gives them back when freed. A CNN's activations at batch 64 are tens of MB each, so
every op of every batch faults in and zeroes new pages. Measured on the 2-core AVX-512 machine
(EfficientNet-Lite0, 224 px, batch 64, 960 images): 5.1 million page faults per pass in bf16 and
as much time in the kernel as in the model. With the mmap threshold at 1 GB and trimming off, the
heap keeps freed memory and the next batch reuses it: no page faults, and the bare forward goes
from 83 to 181 img/s in bf16 and from 33 to 103 img/s in fp32 (`bench/allocator.py`,
docs/benchmarks.md); a training step gains 1.2x, since its allocations mostly stay under 32 MB
already.

Trimming is off, not merely raised: with the trim threshold at 1 GB as well, an fp32 forward at
batch 64, whose heap peaks just over 1 GB, sometimes ended a batch with more than 1 GB
free at the top of the heap, glibc gave it back, and the next batch faulted it all in again
(about 830 000 faults per three batches instead of 0, in roughly half of the fresh processes,
depending on where small allocations landed). With trimming off the outcome no longer depends on
the layout. The price: the heap keeps its peak until the process ends rather than giving freed
memory back to the OS (max RSS, the peak, grows: a `full` fp32 training step at batch 32 peaks at
4.6 GB with the raised thresholds, 4.0 GB with glibc's defaults).
A long-running process with rare large transients (the server decoding a big image in one of its
threads, each thread with its own malloc arena) calls `release_free_memory` after them instead.
`GRAFT_TUNE_MALLOC=0` leaves malloc as it is. Nothing changes on other C libraries or systems.
PyTorch's own advice for CPU inference is the same cure from outside (preloading jemalloc or
tcmalloc); a library cannot preload, but it can set glibc's thresholds for its own process.
"""

from __future__ import annotations

import ctypes
import os
import sys

THRESHOLD_BYTES = 2**30
# mallopt(3) documents 32 MB (on 64-bit) as the largest mmap threshold; glibc 2.36 here accepts
# 1 GB and uses it. Where 1 GB is refused, 32 MB at least keeps every smaller tensor on the heap.
FALLBACK_THRESHOLD_BYTES = 32 * 2**20
NO_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely."
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap threshold and turn trimming off for this process, once; True if set.

    Called by `load_backbone` and `load_bundle`, so every run of a model gets it. Idempotent.
    """
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def release_free_memory() -> bool:
    """Give the free memory of every malloc arena back to the OS now (glibc's `malloc_trim(0)`).

    With trimming off, memory freed after a large transient stays in the process until it ends;
    this returns it, for a process that runs on (the server, after decoding a large image). The
    next allocations fault their pages in again, so it belongs after rare large transients, not
    after every batch. False, and nothing done, where the C library is not glibc.
    """
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
    except (OSError, AttributeError):
        return None
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def _set_thresholds() -> bool:
    libc = _glibc()
    if os.environ.get("GRAFT_TUNE_MALLOC", "1").strip() == "0" or libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for threshold in (THRESHOLD_BYTES, FALLBACK_THRESHOLD_BYTES):
        if mallopt(_M_MMAP_THRESHOLD, threshold):
            return bool(mallopt(_M_TRIM_THRESHOLD, NO_TRIM))
    return False
