"""Honest memory measures for training on CPU (where torch.cuda.max_memory_allocated is absent).

* :class:`SavedTensorMeter`: bytes of the distinct tensors autograd saves for backward during
  one step, through :func:`torch.autograd.graph.saved_tensors_hooks`. Storages that belong to
  the model's parameters and buffers are left out: they are resident anyway, so saving a
  reference to them costs nothing. Deterministic; blind to what a custom autograd Function
  keeps as plain ``ctx`` attributes instead of ``save_for_backward``.
* :func:`rss_peak_meter`: growth of the process's peak resident set (``VmHWM``) during a
  block, after resetting the peak through ``/proc/self/clear_refs`` (Linux). Includes
  everything (gradients, optimizer state, temporaries) but depends on the allocator.
* :func:`resident_bytes`: bytes held by a model's parameters, buffers and bitsandbytes'
  quantization states (which are neither).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SavedTensorMeter", "resident_bytes", "rss_peak_meter"]


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


class SavedTensorMeter:
    """Peak over steps of the bytes saved for backward (distinct storages, model state excluded)."""

    def __init__(self, model: nn.Module) -> None:
        self.resident = {_storage_key(t)[0] for t in chain(model.parameters(), model.buffers())}
        self.peak_bytes = 0
        self.last_bytes = 0

    @contextmanager
    def step(self) -> Iterator[None]:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr, nbytes = _storage_key(t)
            if ptr and ptr not in self.resident:
                seen[ptr] = max(seen.get(ptr, 0), nbytes)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.last_bytes = sum(seen.values())
        self.peak_bytes = max(self.peak_bytes, self.last_bytes)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so a block's RSS growth is its own and
    not hidden by memory an earlier run freed but the allocator kept."""
    gc.collect()
    with suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def rss_peak_meter() -> Iterator[dict[str, Any]]:
    """Yields a dict that holds ``delta`` (bytes) after the block, or None where unsupported."""
    result: dict[str, Any] = {"delta": None}
    _trim_heap()
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        pass
    before = _status_kib("VmRSS")
    try:
        yield result
    finally:
        peak = _status_kib("VmHWM")
        if reset and before is not None and peak is not None:
            result["delta"] = max(peak - before, 0) * 1024


def resident_bytes(model: nn.Module) -> int:
    """Bytes of parameters, buffers and bitsandbytes ``quant_state`` tensors, each storage once."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        ptr, nbytes = _storage_key(t)
        if ptr not in seen:
            seen.add(ptr)
            total += nbytes

    for t in chain(model.parameters(), model.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for attr in ("absmax", "offset"):
                v = getattr(state, attr, None)
                if isinstance(v, torch.Tensor):
                    add(v)
            inner = getattr(state, "state2", None)
            if inner is not None and isinstance(getattr(inner, "absmax", None), torch.Tensor):
                add(inner.absmax)
    return total
