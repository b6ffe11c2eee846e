"""Checks of a DoRA adapter read back from a checkpoint."""

from __future__ import annotations

from lqmod.nn.adapter import Adapter, check_finite_state

__all__ = ["validate"]


def validate(adapter: Adapter) -> None:
    """Finite tensors, and a magnitude vector with one entry per output row."""
    check_finite_state(adapter)
    magnitude = getattr(adapter, "magnitude", None)
    rows = adapter.lora_B.shape[0]
    if magnitude is None or tuple(magnitude.shape) != (rows,):
        got = None if magnitude is None else tuple(magnitude.shape)
        raise ValueError(f"dora adapter's magnitude vector is {got}, expected ({rows},): one entry per output row")
