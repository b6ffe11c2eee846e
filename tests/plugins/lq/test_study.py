"""The NF error curve used to judge lq points: lower convex hull and interpolation."""

from __future__ import annotations

import pytest

from lqmod_lq.study import curve_at, lower_hull


def test_lower_hull_drops_dominated_and_non_convex_points() -> None:
    points = [(2.0, 0.6), (2.25, 0.45), (3.0, 0.44), (3.1, 0.2), (3.0, 0.7), (4.1, 0.09), (5.0, 0.088)]
    # (3.0, 0.44) is Pareto-optimal (fewer bits than any better point) but above the chord
    # from (2.25, 0.45) to (3.1, 0.2): mixing those two does better. (3.0, 0.7) is dominated.
    assert lower_hull(points) == [(2.0, 0.6), (2.25, 0.45), (3.1, 0.2), (4.1, 0.09), (5.0, 0.088)]


def test_curve_at_interpolates_linearly() -> None:
    hull = [(2.0, 0.6), (3.0, 0.2), (4.0, 0.1)]
    assert curve_at(hull, 2.5) == pytest.approx(0.4)
    assert curve_at(hull, 3.0) == pytest.approx(0.2)
    assert curve_at(hull, 1.9) is None and curve_at(hull, 4.1) is None
