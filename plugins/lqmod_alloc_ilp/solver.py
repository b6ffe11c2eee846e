"""The budget allocation as a 0/1 integer program, solved by HiGHS through ``scipy.optimize.milp``.

Variables ``x[m, o]`` (matrix m takes option o) after dropping dominated options::

    minimise   sum_{m,o} err[m,o] x[m,o]
    subject to sum_o x[m,o] = 1                 for every matrix m
               sum_{m,o} bits[m,o] x[m,o] <= B
               x binary

The objective and the budget row are rescaled (the solution does not change) so the
solver's absolute tolerances mean the same thing for any model size. The answer is checked
in exact integer bits; if the solver's feasibility tolerance let it overshoot the budget by a
few bits, the budget row is tightened by the overshoot and the program solved again.
"""

from __future__ import annotations

import math
import time

import numpy as np
from pydantic import Field
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from lqmod.allocation.pareto import pareto_front
from lqmod.config import FrozenModel
from lqmod.types import AllocationProblem, AllocationResult

__all__ = ["ILPConfig", "allocate"]

_STATUS = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded", 4: "error"}
_MAX_TIGHTEN = 5


class ILPConfig(FrozenModel):
    time_limit: float = Field(60.0, gt=0, description="seconds HiGHS may spend before returning its best plan")
    mip_rel_gap: float = Field(
        1e-6, ge=0, le=1, description="stop once the plan is proven within this relative gap of the optimum"
    )
    prune_dominated: bool = Field(
        True, description="drop options with more bits and more error than another option of the same matrix"
    )
    presolve: bool = True


def allocate(problem: AllocationProblem, config: ILPConfig) -> AllocationResult:
    problem.check_feasible()
    start = time.perf_counter()
    names = list(problem.candidates)
    keep = {
        n: pareto_front(problem.candidates[n]) if config.prune_dominated else list(range(len(problem.candidates[n])))
        for n in names
    }
    n_before = sum(len(problem.candidates[n]) for n in names)
    var_matrix = np.concatenate([np.full(len(keep[n]), k) for k, n in enumerate(names)])
    var_option = [i for n in names for i in keep[n]]
    err = np.array([problem.candidates[n][i].error for n in names for i in keep[n]], dtype=np.float64)
    bits = np.array([problem.candidates[n][i].bits for n in names for i in keep[n]], dtype=np.float64)
    n_vars = len(err)

    # Every error is shifted by its matrix's smallest one: a constant, since each matrix takes
    # exactly one option; it keeps the objective's magnitude, and so the gap, meaningful.
    base = np.array([min(problem.candidates[n][i].error for i in keep[n]) for n in names])
    cost = err - base[var_matrix]
    # HiGHS also stops at an *absolute* gap of 1e-6 (scipy does not expose that setting), so
    # the objective is scaled up, not down: the worst plan (every matrix at its largest error)
    # costs 1e6, which makes the absolute criterion negligible next to the relative one.
    worst = float(sum(cost[var_matrix == k].max() for k in range(len(names))))
    scale = worst / 1e6 if worst > 0 else 1.0
    one_hot = csr_array((np.ones(n_vars), (var_matrix, np.arange(n_vars))), shape=(len(names), n_vars))
    pick_one = LinearConstraint(one_hot, lb=1, ub=1)
    options = {"time_limit": config.time_limit, "mip_rel_gap": config.mip_rel_gap, "presolve": config.presolve}

    budget = float(problem.budget_bits)
    res = None
    choice: dict[str, int] = {}
    for _ in range(_MAX_TIGHTEN):
        budget_row = LinearConstraint(csr_array(bits[None, :] / problem.budget_bits), ub=budget / problem.budget_bits)
        res = milp(
            cost / scale,
            integrality=np.ones(n_vars),
            bounds=Bounds(0, 1),
            constraints=[pick_one, budget_row],
            options=options,
        )
        if res.x is None:
            break
        picked = np.flatnonzero(res.x > 0.5)
        choice = {names[var_matrix[v]]: var_option[v] for v in picked}
        if len(choice) != len(names) or len(picked) != len(names):
            raise RuntimeError(f"HiGHS returned a non-binary solution ({res.message}); please report this")
        _, total = problem.cost(choice)
        if total <= problem.budget_bits:
            break
        budget -= total - problem.budget_bits
        choice = {}
    assert res is not None
    status = _STATUS.get(res.status, f"status {res.status}")
    if not choice:
        raise RuntimeError(
            f"HiGHS found no plan within {problem.budget_bits} bits although the cheapest options fit "
            f"({problem.min_bits()} bits): {res.message}"
        )
    gap = getattr(res, "mip_gap", None)
    gap = float(gap) if gap is not None and math.isfinite(gap) else None
    return AllocationResult(
        choice=choice,
        status=status,
        gap=gap,
        info={
            "solver": "scipy.optimize.milp (HiGHS)",
            "message": str(res.message),
            "seconds": time.perf_counter() - start,
            "variables": n_vars,
            "options_before_pruning": n_before,
            "dominated_pruned": n_before - n_vars,
            "nodes": int(getattr(res, "mip_node_count", 0) or 0),
            "mip_rel_gap": config.mip_rel_gap,
        },
    )
