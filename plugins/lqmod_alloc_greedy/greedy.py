"""Greedy budget allocation: best error saved per extra bit first, along each matrix's convex hull.

Every matrix starts at its cheapest option. The candidate upgrades are the steps along each
matrix's lower convex hull of (bits, error); their savings per bit decrease along a hull, so
a heap of each matrix's next step yields the globally best step. A step that does not fit
the remaining budget ends that matrix's climb (its later steps cost more). Finally, with
``fill``, leftover bits buy the largest single error reductions that still fit, hull or not.
This is the classic LP-relaxation greedy: fast, usually close to, never better than the ILP.
"""

from __future__ import annotations

import heapq
import time

from pydantic import Field

from lqmod.allocation.pareto import lower_convex_hull
from lqmod.config import FrozenModel
from lqmod.types import AllocationProblem, AllocationResult

__all__ = ["GreedyConfig", "allocate"]


class GreedyConfig(FrozenModel):
    fill: bool = Field(True, description="spend leftover bits on the best single upgrades that still fit")


def allocate(problem: AllocationProblem, config: GreedyConfig) -> AllocationResult:
    problem.check_feasible()
    start = time.perf_counter()
    cands = problem.candidates
    hulls = {n: lower_convex_hull(rows) for n, rows in cands.items()}
    pos = dict.fromkeys(cands, 0)  # position along each hull
    used = sum(cands[n][h[0]].bits for n, h in hulls.items())
    left = problem.budget_bits - used

    heap: list[tuple[float, int, str]] = []

    def push(name: str) -> None:
        hull, k = hulls[name], pos[name]
        if k + 1 < len(hull):
            a, b = cands[name][hull[k]], cands[name][hull[k + 1]]
            heapq.heappush(heap, (-(a.error - b.error) / (b.bits - a.bits), b.bits - a.bits, name))

    for name in cands:
        push(name)
    steps = 0
    while heap:
        _, extra, name = heapq.heappop(heap)
        if extra > left:
            continue
        left -= extra
        pos[name] += 1
        steps += 1
        push(name)
    choice = {n: hulls[n][pos[n]] for n in cands}

    filled = 0
    if config.fill:
        while True:
            best: tuple[float, str, int] | None = None
            for name, rows in cands.items():
                now = rows[choice[name]]
                for i, c in enumerate(rows):
                    gain = now.error - c.error
                    if gain > 0 and c.bits - now.bits <= left and (best is None or gain > best[0]):
                        best = (gain, name, i)
            if best is None:
                break
            _, name, i = best
            left -= cands[name][i].bits - cands[name][choice[name]].bits
            choice[name] = i
            filled += 1
    return AllocationResult(
        choice=choice,
        status="heuristic",
        gap=None,
        info={"seconds": time.perf_counter() - start, "hull_steps": steps, "fill_steps": filled},
    )
