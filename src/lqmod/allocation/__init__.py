"""Budget allocation: error tables over every registered option, allocator plug-ins, plans.

``plan_model(model, "3.25")`` builds the error table (cached), asks an allocator plug-in
("ilp", "greedy", or a third party's) for one option per matrix, and returns a
:class:`~lqmod.config.Plan` that ``quantize_model(model, plan=plan)`` reads.
"""

from __future__ import annotations

from lqmod.allocation.budget import Budget, parse_budget
from lqmod.allocation.cache import TableCache, default_cache_root
from lqmod.allocation.options import collect_options
from lqmod.allocation.pareto import lower_convex_hull, pareto_front
from lqmod.allocation.planner import allocate_table, plan_model
from lqmod.allocation.table import ErrorTable, MatrixInfo, build_error_table, build_model_error_table
from lqmod.types import AllocationProblem, AllocationResult, Candidate, InfeasibleBudget

__all__ = [
    "AllocationProblem",
    "AllocationResult",
    "Budget",
    "Candidate",
    "ErrorTable",
    "InfeasibleBudget",
    "MatrixInfo",
    "TableCache",
    "allocate_table",
    "build_error_table",
    "build_model_error_table",
    "collect_options",
    "default_cache_root",
    "lower_convex_hull",
    "pareto_front",
    "parse_budget",
    "plan_model",
]
