"""Per-matrix pruning of an allocation problem: the Pareto front and its lower convex hull.

Both keep at least one optimal solution of the budget problem: a dominated candidate (no
fewer bits *and* no less error than another) can always be swapped for the one dominating it.
"""

from __future__ import annotations

from collections.abc import Sequence

from lqmod.types import Candidate

__all__ = ["lower_convex_hull", "pareto_front"]


def pareto_front(rows: Sequence[Candidate]) -> list[int]:
    """Indices of the non-dominated candidates, by increasing bits (and decreasing error).

    Of candidates with equal bits and equal error the first listed is kept.
    """
    order = sorted(range(len(rows)), key=lambda i: (rows[i].bits, rows[i].error, i))
    front: list[int] = []
    best = float("inf")
    for i in order:
        if rows[i].error < best:
            front.append(i)
            best = rows[i].error
    return front


def lower_convex_hull(rows: Sequence[Candidate]) -> list[int]:
    """Indices of the Pareto candidates on the lower convex hull of (bits, error), by bits.

    Along the hull the error saved per extra bit decreases, which is what makes the greedy
    "best saving per bit first" order well defined.
    """
    hull: list[int] = []
    for i in pareto_front(rows):
        while len(hull) >= 2:
            a, b = rows[hull[-2]], rows[hull[-1]]
            c = rows[i]
            # b lies on or above the segment a-c: it never is the best step, drop it.
            # (cross-multiplied slopes: exact for integer bits, no division by zero)
            if (a.error - b.error) * (c.bits - a.bits) <= (a.error - c.error) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull
