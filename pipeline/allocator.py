"""glibc's malloc set up for batches of tensors: memory freed by one batch serves the next.

PyTorch takes its CPU tensors from malloc. glibc serves every request above its mmap threshold
(dynamic, at most 32 MiB on 64-bit Linux) with a fresh ``mmap`` and unmaps it on ``free``, and it
gives the top of its heap back to the kernel once more than the trim threshold is free there. A
batch's large activations therefore come back as new pages every time, which the kernel faults
in and zeroes: EfficientNet-Lite0's first activation for 32 images is 51 MB, and for an
Aug-MSROI pass of 32 images x 5 perturbations, 257 MB. On this project's 2-core machine half of
an evaluate run's CPU time went to the kernel this way (``/usr/bin/time``: 139 s user, 158 s
system), and at batch 32 a forward pass ran 3.7x and an attack step 2.7x slower than with the
memory kept (``bench/allocator.py``). Once the heap has grown to a stage's working set (within
its first batches), its batches fault in no new pages.

:func:`keep_freed_memory` turns that off for the process: no ``mmap`` for single allocations
(``M_MMAP_MAX`` 0, so large blocks come from the heap and are reused) and a trim threshold of
:data:`TRIM_THRESHOLD` (the heap keeps up to that much free memory at its top). The process's
memory no longer shrinks after a peak, so a worker holds the largest batch's working set; that is
the usual trade of an allocator built for throughput (jemalloc and tcmalloc make it too).

It is called when a stage loads its model, so it applies to every worker process of every runner.
Set ``SEMJPEG_SYSTEM_MALLOC=1`` to leave glibc's defaults alone (for instance to preload jemalloc
or tcmalloc instead); on other C libraries it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading

log = logging.getLogger(__name__)

#: Free memory the heap may keep at its top before giving it back to the kernel.
TRIM_THRESHOLD = 1 << 30

# malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_LOCK = threading.Lock()
_STATE: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Keep freed memory in this process for reuse (see the module docstring); once per process.

    Returns whether glibc's settings are now changed: False on another C library, when
    ``SEMJPEG_SYSTEM_MALLOC`` is set to anything but ``0``, or when ``mallopt`` refuses."""
    with _LOCK:  # a forked child inherits both glibc's settings and this answer
        if "applied" not in _STATE:
            _STATE["applied"] = _apply()
        return _STATE["applied"]


def _apply() -> bool:
    if os.environ.get("SEMJPEG_SYSTEM_MALLOC", "0") not in ("", "0"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if ok:
        log.debug("malloc: large blocks from the heap, %d MiB kept free at its top", TRIM_THRESHOLD >> 20)
    return ok
