"""The backend interface and the choice between backends."""

from __future__ import annotations

from typing import Protocol

import torch

from lqmod.types import Materialize, QuantizedWeight


class KernelBackend(Protocol):
    name: str

    def linear(self, x: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape (..., in_features)."""
        ...

    def linear_t(self, g: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        """``g @ W`` for ``g`` of shape (..., out_features): the input gradient."""
        ...


def select_backend(qweight: QuantizedWeight, device: torch.device) -> KernelBackend:
    """The fastest backend that declares support for this weight's format on ``device``.

    The reference backend supports everything and is the default on CPU.
    """
    from lqmod.kernels.reference import REFERENCE

    return REFERENCE
