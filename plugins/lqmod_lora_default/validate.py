"""Checks of a LoRA adapter read back from a checkpoint: finite A and B (their shapes are
checked when the state is loaded)."""

from __future__ import annotations

from lqmod.nn.adapter import Adapter, check_finite_state

__all__ = ["validate"]


def validate(adapter: Adapter) -> None:
    check_finite_state(adapter)
