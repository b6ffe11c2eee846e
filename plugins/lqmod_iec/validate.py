"""Checks of an IEC adapter read back from a checkpoint."""

from __future__ import annotations

from lqmod.nn.adapter import Adapter, check_finite_state

__all__ = ["validate"]


def validate(adapter: Adapter) -> None:
    """Finite tensors and one scalar per elastic path."""
    check_finite_state(adapter)
    for name in ("beta_A", "beta_B"):
        t = getattr(adapter, name, None)
        if t is None or tuple(t.shape) != (1,):
            raise ValueError(f"iec adapter's {name} is {None if t is None else tuple(t.shape)}, expected (1,)")
