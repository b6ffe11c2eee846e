"""Allocator "ilp": the optimal budget allocation as a 0/1 integer program (scipy milp / HiGHS)."""

from __future__ import annotations

from collections.abc import Iterator

import lqmod
from lqmod.types import AllocatorSpec
from lqmod_alloc_ilp.solver import ILPConfig, allocate

__all__ = ["ILPConfig", "allocate", "lqmod_allocators"]


@lqmod.hookimpl
def lqmod_allocators() -> Iterator[AllocatorSpec]:
    yield AllocatorSpec(
        name="ilp",
        config_model=ILPConfig,
        allocate=allocate,
        description="optimal option per matrix under a bit budget: 0/1 ILP via scipy.optimize.milp (HiGHS)",
    )
