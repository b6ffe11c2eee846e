"""Tensor comparisons the contract suites share: relative error, bitwise equality, saved tensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact||_F / ||exact||_F``, computed in float64."""
    exact64 = exact.double()
    return float((approx.double() - exact64).norm() / exact64.norm())


def dense_sized_saved_tensors(
    module: nn.Module, x: torch.Tensor, shape: tuple[int, int]
) -> tuple[torch.Tensor, list[tuple[tuple[int, ...], torch.dtype]]]:
    """Run ``module(x)`` and list the floating-point tensors autograd saved for backward that
    are as large as a dense ``shape`` weight (or larger).

    A materialize-in-backward layer saves only the quantized tensors, the (small) adapter
    and its inputs; a float tensor with ``out * in`` elements means the dense weight (or a
    flattened copy of it) is being kept alive until backward. The caller must keep ``x``
    and the adapter smaller than that for the answer to mean anything.
    """
    numel = shape[0] * shape[1]
    found: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.numel() >= numel:
            found.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return out, found


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike ``torch.equal``, NaN == NaN and -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def _prefixed(prefix: str) -> Callable[[str], str]:
    # assert_close's msg callable; a factory, so each message binds its own prefix.
    return lambda message: f"{prefix}: {message}"


def _json_normalised(value: Any) -> Any:
    # What a header looks like after a trip through a checkpoint (tuples become lists ...).
    return json.loads(json.dumps(value, sort_keys=True))
