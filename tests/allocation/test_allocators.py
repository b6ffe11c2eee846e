"""The "ilp" and "greedy" allocator plug-ins against brute force on small random problems."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest

from lqmod.allocation.pareto import lower_convex_hull, pareto_front
from lqmod.config import QuantizerConfig
from lqmod.plugins import Registry
from lqmod.types import AllocationProblem, AllocationResult, Candidate, InfeasibleBudget, Option
from lqmod_alloc_greedy import GreedyConfig
from lqmod_alloc_greedy import allocate as greedy
from lqmod_alloc_ilp import ILPConfig
from lqmod_alloc_ilp import allocate as ilp

MakeProblem = Callable[..., AllocationProblem]


def brute_force(problem: AllocationProblem) -> float:
    names = list(problem.candidates)
    best = math.inf
    for combo in itertools.product(*(range(len(problem.candidates[n])) for n in names)):
        err, bits = problem.cost(dict(zip(names, combo, strict=True)))
        if bits <= problem.budget_bits:
            best = min(best, err)
    return best


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("frac", [0.0, 0.1, 0.35, 0.7, 1.0])
def test_ilp_is_optimal_and_greedy_feasible(make_problem: MakeProblem, seed: int, frac: float) -> None:
    problem = make_problem(5, 4, seed=seed, budget_frac=frac)
    best = brute_force(problem)
    res = ilp(problem, ILPConfig(mip_rel_gap=0))
    err, bits = problem.cost(res.choice)
    assert res.status == "optimal"
    assert bits <= problem.budget_bits
    assert err == pytest.approx(best, rel=1e-9, abs=1e-12)

    g = greedy(problem, GreedyConfig())
    g_err, g_bits = problem.cost(g.choice)
    assert set(g.choice) == set(problem.candidates)
    assert g_bits <= problem.budget_bits
    assert g_err >= best - 1e-9 * best


@pytest.mark.parametrize("seed", range(4))
def test_ilp_exact_with_integer_errors_and_without_pruning(make_problem: MakeProblem, seed: int) -> None:
    problem = make_problem(5, 4, seed=100 + seed, budget_frac=0.4, integer_errors=True)
    best = brute_force(problem)
    for prune in (True, False):
        res = ilp(problem, ILPConfig(mip_rel_gap=0, prune_dominated=prune))
        assert problem.cost(res.choice)[0] == best


def test_pruning_is_reported(make_problem: MakeProblem) -> None:
    problem = make_problem(6, 8, seed=3)
    removed = sum(len(r) - len(pareto_front(r)) for r in problem.candidates.values())
    assert removed > 0  # random rows always have some dominated options: the test means something
    res = ilp(problem, ILPConfig())
    assert res.info["dominated_pruned"] == removed
    assert res.info["variables"] == sum(len(r) for r in problem.candidates.values()) - removed


def test_infeasible_budget_states_the_exact_minimum(make_problem: MakeProblem) -> None:
    problem = make_problem(5, 4, seed=1)
    low = problem.min_bits()
    tight = AllocationProblem(problem.candidates, low - 1, problem.numel)
    runs: list[Callable[[], AllocationResult]] = [
        lambda: ilp(tight, ILPConfig()),
        lambda: greedy(tight, GreedyConfig()),
    ]
    for run in runs:
        with pytest.raises(InfeasibleBudget) as info:
            run()
        assert info.value.min_bits == low
        assert isinstance(info.value, ValueError)
        msg = str(info.value)
        assert f"{low / problem.n_params:.4f} bits/param" in msg
        assert f"{low / 8:.0f} bytes" in msg


def test_budget_exactly_at_minimum_is_feasible(make_problem: MakeProblem) -> None:
    problem = make_problem(5, 4, seed=2)
    exact = AllocationProblem(problem.candidates, problem.min_bits(), problem.numel)
    for res in (ilp(exact, ILPConfig()), greedy(exact, GreedyConfig())):
        err, bits = exact.cost(res.choice)
        assert bits == exact.min_bits()
        # Among the cheapest options of each matrix, the one with the least error.
        want = sum(min(c.error for c in r if c.bits == min(x.bits for x in r)) for r in exact.candidates.values())
        assert err == pytest.approx(want)


def test_large_synthetic_table_solves_to_optimality(make_problem: MakeProblem) -> None:
    problem = make_problem(1000, 30, seed=7, budget_frac=0.4)
    res = ilp(problem, ILPConfig(mip_rel_gap=1e-6, time_limit=120))
    _, bits = problem.cost(res.choice)
    assert bits <= problem.budget_bits
    assert res.status == "optimal"
    assert res.gap is not None
    assert res.gap <= 1e-6
    g = greedy(problem, GreedyConfig())
    assert problem.cost(g.choice)[0] >= problem.cost(res.choice)[0] * (1 - 1e-6)


class _C(QuantizerConfig):
    k: int = 0


def _rows(points: list[tuple[int, float]]) -> list[Candidate]:
    return [Candidate(Option("q", _C(k=i)), e, b) for i, (b, e) in enumerate(points)]


def test_pareto_front_and_hull() -> None:
    rows = _rows([(10, 5.0), (20, 6.0), (20, 3.0), (30, 2.9), (40, 1.0), (15, 5.0), (50, 1.0)])
    # (20, 6) and (15, 5) dominated, (50, 1.0) dominated by (40, 1.0)
    assert pareto_front(rows) == [0, 2, 3, 4]
    # (30, 2.9) lies above the segment (20, 3) - (40, 1): not on the hull
    assert lower_convex_hull(rows) == [0, 2, 4]


def test_allocators_are_plugins(alloc_registry: Registry) -> None:
    allocators = alloc_registry.allocators()
    assert {"ilp", "greedy"} <= set(allocators)
    assert allocators["ilp"].config_model is ILPConfig
    assert allocators["greedy"].allocate is greedy
    assert isinstance(ilp(_small(), ILPConfig()), AllocationResult)


def _small() -> AllocationProblem:
    rows = _rows([(10, 5.0), (20, 1.0)])
    return AllocationProblem({"a": rows, "b": rows}, 30, {"a": 4, "b": 4})


def test_greedy_spends_leftover_on_best_upgrade() -> None:
    # Greedy's hull order takes a (saves 4/10 per bit); fill then cannot upgrade b: 30 bits allow one upgrade.
    res = greedy(_small(), GreedyConfig())
    assert sorted(res.choice.values()) == [0, 1]
