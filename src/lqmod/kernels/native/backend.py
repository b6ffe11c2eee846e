"""The compiled CPU backend for weights a quantizer describes as a :class:`LutFormat`.

Per call it asks the quantizer's ``lut_format`` (a direct reference, never the plug-in
registry) for the format, rebuilds the dense weight with the compiled kernel (bit for bit
the torch reference's weight), hands it to torch's matmul and drops it. What the declared
capabilities do not cover (float64 inputs, a weight without a LutFormat) goes to the torch
reference, so a model never fails for having picked this backend.
"""

from __future__ import annotations

import torch

from lqmod.kernels.base import Capabilities, LutFormatFn
from lqmod.kernels.formats import LUT_BITS
from lqmod.kernels.native import OUT_DTYPES, lut_materialize
from lqmod.kernels.reference import REFERENCE
from lqmod.types import Materialize, QuantizedWeight

__all__ = ["NATIVE", "NativeLutBackend"]

NATIVE = Capabilities(
    devices=frozenset({"cpu"}),
    bits=frozenset(LUT_BITS),
    dtypes=frozenset(OUT_DTYPES),
)


class NativeLutBackend:
    """``x @ W.T`` and ``g @ W`` with ``W`` rebuilt by the compiled CPU LUT kernel."""

    name = "native"

    def __init__(self, lut_format: LutFormatFn):
        self._lut_format = lut_format

    def weight(self, qweight: QuantizedWeight, materialize: Materialize, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight in ``dtype``: the kernel's where it applies, else ``materialize``'s."""
        if dtype in OUT_DTYPES:
            fmt = self._lut_format(qweight)
            if fmt is not None and fmt.device.type == "cpu":
                return lut_materialize(fmt, dtype)
        return materialize(qweight, dtype)

    def linear(self, x: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        if x.device.type != "cpu":
            return REFERENCE.linear(x, qweight, materialize)
        return torch.matmul(x, self.weight(qweight, materialize, x.dtype).t())

    def linear_t(self, g: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        if g.device.type != "cpu":
            return REFERENCE.linear_t(g, qweight, materialize)
        return torch.matmul(g, self.weight(qweight, materialize, g.dtype))
