"""Fresh output buffers backed by transparent huge pages where the OS offers them.

A materialized LLaMA-sized weight (64 MiB at 4096 x 4096 float32) is a fresh ``mmap`` from
the C allocator on every call, and its first touch costs one page fault per 4 KiB page:
about 40 ms of kernel time on a VM, eight times the kernel's own writes. Advising the
untouched buffer ``MADV_HUGEPAGE`` (Linux, THP in "madvise" or "always" mode) makes that 32
faults of 2 MiB. Only the 2 MiB-aligned interior of the buffer is advised, so no memory
outside it changes; where the call is unavailable or refused nothing happens.

``LQMOD_HUGEPAGES=0`` turns the advice off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

import torch

__all__ = ["HUGE_PAGE", "MIN_BYTES", "advise", "empty"]

HUGE_PAGE = 1 << 21
MIN_BYTES = 2 * HUGE_PAGE  # below this a buffer rarely holds a whole aligned huge page
_MADV_HUGEPAGE = 14


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("LQMOD_HUGEPAGES", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_call = _madvise()


def advise(t: torch.Tensor) -> bool:
    """Advise huge pages for ``t``'s aligned interior; True when the OS accepted the advice.

    Only useful before the buffer is first written: pages already present stay as they are.
    """
    nbytes = t.numel() * t.element_size()
    if _call is None or nbytes < MIN_BYTES or not t.is_cpu:
        return False
    ptr = t.data_ptr()
    start = (ptr + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = (ptr + nbytes) & ~(HUGE_PAGE - 1)
    return end > start and _call(start, end - start, _MADV_HUGEPAGE) == 0


def empty(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(rows, cols, dtype=dtype)`` on the CPU, huge-page advised when large."""
    out = torch.empty(rows, cols, dtype=dtype)
    advise(out)
    return out
