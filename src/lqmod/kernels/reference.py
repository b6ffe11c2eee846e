"""Plain-torch backend: materialize the whole weight, matmul, drop it.

The dense weight lives only for the duration of one matmul; nothing here is saved for
autograd (see :mod:`lqmod.autograd`).
"""

from __future__ import annotations

import torch

from lqmod.types import Materialize, QuantizedWeight


class ReferenceBackend:
    name = "torch"

    def linear(self, x: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        weight = materialize(qweight, x.dtype)
        return torch.matmul(x, weight.t())

    def linear_t(self, g: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        weight = materialize(qweight, g.dtype)
        return torch.matmul(g, weight)


REFERENCE = ReferenceBackend()
