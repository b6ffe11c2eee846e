"""An allocator registration (``AllocatorSpec``), the problem it solves and its answer."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lqmod.config import FrozenModel
from lqmod.types.quantizers import Option
from lqmod.types.weights import JSONValue


class Candidate(NamedTuple):
    """One row of an allocation problem: an option for a matrix, its error and its exact storage bits."""

    option: Option
    error: float
    bits: int


class InfeasibleBudget(ValueError):
    """The budget is below the smallest feasible one (the cheapest option for every matrix).

    ``min_bits`` is that smallest feasible budget; the message states it in bits per parameter
    (when ``n_params`` is known) and in bytes, so the user can pick a budget that works.
    """

    def __init__(self, budget_bits: int, min_bits: int, n_params: int | None = None) -> None:
        self.budget_bits = budget_bits
        self.min_bits = min_bits
        self.n_params = n_params

        def describe(bits: int) -> str:
            avg = f"{bits / n_params:.4f} bits/param = " if n_params else ""
            return f"{avg}{bits / 8:.0f} bytes ({bits} bits)"

        super().__init__(
            f"budget {describe(budget_bits)} is infeasible: the smallest feasible budget, the cheapest "
            f"option for every matrix, is {describe(min_bits)}"
        )


@dataclass(frozen=True)
class AllocationProblem:
    """What an allocator solves: choose one candidate per matrix, total bits <= ``budget_bits``.

    ``candidates`` maps each matrix name to its options (every one valid for that matrix);
    ``numel`` maps it to its parameter count. The objective is the sum of the chosen errors.
    """

    candidates: Mapping[str, Sequence[Candidate]]
    budget_bits: int
    numel: Mapping[str, int]

    @property
    def n_params(self) -> int:
        return sum(self.numel[name] for name in self.candidates)

    def min_bits(self) -> int:
        """The smallest feasible budget: the cheapest candidate of every matrix."""
        return sum(min(c.bits for c in rows) for rows in self.candidates.values())

    def check_feasible(self) -> None:
        """Raise :class:`InfeasibleBudget` when even the cheapest choice exceeds the budget."""
        empty = [name for name, rows in self.candidates.items() if not rows]
        if empty:
            raise ValueError(f"no valid option for matrices {empty[:5]}: nothing can be allocated")
        low = self.min_bits()
        if low > self.budget_bits:
            raise InfeasibleBudget(self.budget_bits, low, self.n_params)

    def cost(self, choice: Mapping[str, int]) -> tuple[float, int]:
        """(total error, total bits) of a choice (matrix -> candidate index)."""
        err = math.fsum(self.candidates[n][i].error for n, i in choice.items())
        bits = sum(self.candidates[n][i].bits for n, i in choice.items())
        return err, bits


@dataclass(frozen=True)
class AllocationResult:
    """An allocator's answer: the chosen candidate index per matrix, and how it was found.

    ``status`` is "optimal", "time_limit", "heuristic" ... ; ``gap`` the proven relative
    optimality gap when the allocator knows one; ``info`` any JSON-able solver details.
    """

    choice: dict[str, int]
    status: str = "heuristic"
    gap: float | None = None
    info: dict[str, JSONValue] = field(default_factory=dict)


@dataclass(frozen=True)
class AllocatorSpec:
    """An allocator registration: ``allocate(problem, config) -> AllocationResult``.

    ``problem`` is an :class:`AllocationProblem`; ``config`` a validated ``config_model``
    instance. An allocator raises :class:`InfeasibleBudget` (``problem.check_feasible()``)
    when no choice fits, and must return a choice for every matrix within the budget (the
    planner checks both and calls a violation a plug-in bug).
    """

    name: str
    config_model: type[FrozenModel]
    allocate: Callable[[AllocationProblem, Any], AllocationResult]
    description: str = ""
