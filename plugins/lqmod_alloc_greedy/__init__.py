"""Allocator "greedy": best error reduction per extra bit first (fast, not optimal)."""

from __future__ import annotations

from collections.abc import Iterator

import lqmod
from lqmod.types import AllocatorSpec
from lqmod_alloc_greedy.greedy import GreedyConfig, allocate

__all__ = ["GreedyConfig", "allocate", "lqmod_allocators"]


@lqmod.hookimpl
def lqmod_allocators() -> Iterator[AllocatorSpec]:
    yield AllocatorSpec(
        name="greedy",
        config_model=GreedyConfig,
        allocate=allocate,
        description="greedy: best error saved per extra bit along each matrix's convex hull, then fill",
    )
