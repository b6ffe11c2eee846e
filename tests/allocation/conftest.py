"""Fixtures for the allocation tests: a registry with both allocator plug-ins, synthetic problems."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

import lqmod_alloc_greedy
import lqmod_alloc_ilp
from lqmod.config import QuantizerConfig
from lqmod.plugins import Registry
from lqmod.types import AllocationProblem, Candidate, Option


def with_allocators(registry: Registry) -> Registry:
    """``registry`` with "ilp" and "greedy", registered by hand where the entry points are not installed."""
    have = registry.allocators()
    for name, module in (("ilp", lqmod_alloc_ilp), ("greedy", lqmod_alloc_greedy)):
        if name not in have:
            registry.register(module, name=name, distribution="lqmod (plugins/, by hand)")
    return registry


@pytest.fixture
def alloc_registry() -> Registry:
    return with_allocators(Registry())


@pytest.fixture
def reg() -> Registry:
    """Only NF, OPTQ, the example RTN and the ILP allocator, registered by hand (no entry points)."""
    import lqmod_alloc_ilp
    import lqmod_example_rtn
    import lqmod_nf
    import lqmod_optq

    r = Registry(autoload=False)
    r.register(lqmod_nf, name="nf")
    r.register(lqmod_optq, name="optq")
    r.register(lqmod_example_rtn, name="rtn")
    r.register(lqmod_alloc_ilp, name="ilp")
    return r


class _Dummy(QuantizerConfig):
    k: int = 0


def random_problem(
    n_matrices: int, n_options: int, *, seed: int, budget_frac: float = 0.5, integer_errors: bool = False
) -> AllocationProblem:
    """Random (bits, error) candidates, dominated ones included; the budget a fraction between min and max."""
    rng = random.Random(seed)
    candidates: dict[str, list[Candidate]] = {}
    numel: dict[str, int] = {}
    for m in range(n_matrices):
        n = rng.choice([64, 256, 1024]) * rng.randint(1, 8)
        numel[f"m{m}"] = n
        rows = []
        for o in range(n_options):
            bits = n * rng.randint(2, 8) + rng.randint(0, 64) * 32
            err = float(rng.randint(1, 1000)) if integer_errors else rng.lognormvariate(0, 1.5) * n / bits * 1e3
            rows.append(Candidate(Option("dummy", _Dummy(k=o)), err, bits))
        candidates[f"m{m}"] = rows
    low = sum(min(c.bits for c in r) for r in candidates.values())
    high = sum(max(c.bits for c in r) for r in candidates.values())
    return AllocationProblem(candidates, low + int(budget_frac * (high - low)), numel)


@pytest.fixture
def make_problem() -> Callable[..., AllocationProblem]:
    return random_problem
