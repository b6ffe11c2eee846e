"""Huge-page advice for fresh materialize buffers: applied where the OS offers it, and harmless."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from lqmod.kernels.native import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    if not sys.platform.startswith("linux") or not THP.exists():
        return None
    found = re.search(r"\[(\w+)\]", THP.read_text())
    return found.group(1) if found else None


def _anon_huge_kib(ptr: int, nbytes: int) -> int:
    """AnonHugePages of this process's mappings that overlap ``[ptr, ptr + nbytes)``.

    (The advice splits the buffer's mapping: its aligned interior is a mapping of its own.)
    """
    inside, total = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) < ptr + nbytes and ptr < int(head.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def _vm_flags(ptr: int, nbytes: int) -> set[str]:
    """VmFlags of this process's mappings that overlap ``[ptr, ptr + nbytes)`` ("hg": MADV_HUGEPAGE)."""
    inside, flags = False, set()
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) < ptr + nbytes and ptr < int(head.group(2), 16)
        elif inside and line.startswith("VmFlags:"):
            flags |= set(line.split()[1:])
    return flags


def test_small_buffers_are_left_alone() -> None:
    t = hugepages.empty(3, 5, torch.float32)
    assert t.shape == (3, 5) and t.dtype == torch.float32
    assert not hugepages.advise(torch.empty(hugepages.MIN_BYTES // 4 - 1))


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason=f"THP mode {_thp_mode()}")
def test_large_buffer_is_backed_by_huge_pages() -> None:
    rows, cols = 2048, 2048  # 16 MiB of float32: several aligned 2 MiB pages
    t = hugepages.empty(rows, cols, torch.float32)
    assert t.shape == (rows, cols) and t.is_contiguous()
    assert hugepages.advise(t)  # accepted (the pages are not touched yet)
    # The advice itself is deterministic: the buffer's aligned interior is marked MADV_HUGEPAGE.
    assert "hg" in _vm_flags(t.data_ptr(), 4 * t.numel())
    t.fill_(1.5)
    assert bool((t == 1.5).all())
    # Whether the kernel then finds free 2 MiB pages at fault time depends on fragmentation (a
    # long test run can leave none): measured when it does, not required.
    if _anon_huge_kib(t.data_ptr(), 4 * t.numel()) < 2048:
        pytest.xfail("the kernel backed the advised buffer with small pages (fragmented memory)")


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LQMOD_HUGEPAGES", "0")
    assert hugepages._madvise() is None
    monkeypatch.setenv("LQMOD_HUGEPAGES", "1")
    assert (hugepages._madvise() is not None) == sys.platform.startswith("linux")
