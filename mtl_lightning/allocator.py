"""Keep freed host memory for reuse: a training process asks glibc's ``malloc`` not to hand it back to the OS.

A training step allocates and frees the same large host buffers every step. glibc serves blocks above its mmap
threshold with fresh ``mmap`` pages and trims the top of its heap after large frees, so each step touches new pages
and the kernel zero-fills them again: a page fault per 4 KiB. Gradient methods feel it most (their T per-task
gradients on the representation and their stack are T x batch x width floats each step; docs/benchmarks.md has the
faults per step and what they cost). Raising the mmap threshold to its maximum and disabling trimming makes later
steps reuse the same pages, as jemalloc or tcmalloc would (PyTorch's CPU tuning guide suggests preloading one of
those; this needs nothing preloaded). The cost: the process keeps its peak heap, which a training loop reaches every
step anyway.

The ``mtl`` command calls :func:`keep_freed_memory` once at start; ``MTL_KEEP_FREED_MEMORY=0`` leaves ``malloc`` as it
is. Elsewhere than glibc (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import os

ENV = "MTL_KEEP_FREED_MEMORY"
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit platforms (HEAP_MAX_SIZE / 2): blocks above it stay mmapped.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 2**31 - 1  # an int: never trim the heap's top


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to its maximum and turn off heap trimming; whether it was done.

    Does nothing (False) when ``MTL_KEEP_FREED_MEMORY`` is ``0``/``false``/``no`` or the C library is not glibc.
    """
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def _glibc() -> ctypes.CDLL | None:
    """The C library already loaded in this process, if it is glibc (no search for the file: that runs ldconfig)."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, the C library's among them
    except OSError:  # pragma: no cover - Windows has no such handle
        return None
    # gnu_get_libc_version exists in glibc only: musl and others have no mallopt with these meanings
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc
