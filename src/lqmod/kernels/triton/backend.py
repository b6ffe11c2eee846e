"""The Triton backend for weights a quantizer describes as a :class:`LutFormat`.

Per call it asks the quantizer's ``lut_format`` (a direct reference, never the plug-in
registry) for the format, then runs the fused matmul when the declared ``FUSED``
capabilities cover it, else rebuilds W a block of rows at a time with the dequantize kernel
and hands each block to the vendor matmul (``TILED``), else falls back to the torch
reference. Importing this module does not import triton.
"""

from __future__ import annotations

from typing import Literal

import torch

from lqmod.kernels.base import Capabilities, LutFormatFn
from lqmod.kernels.formats import LUT_BITS, LutFormat
from lqmod.kernels.reference import REFERENCE
from lqmod.kernels.triton import device_kind
from lqmod.types import Materialize, QuantizedWeight

__all__ = ["FUSED", "TILED", "Strategy", "TritonLutBackend"]

_HALF = frozenset({torch.float16, torch.bfloat16})

# What the fused kernels are tested on; tl.dot takes no float64.
FUSED = Capabilities(
    devices=frozenset({"cuda", "interpreter"}),
    bits=frozenset({2, 3, 4, 8}),
    dtypes=_HALF | {torch.float32},
)
# The dequantize kernel shares the fused kernels' tile code and only stores, so it takes
# every width of the bit stream and float64 too.
TILED = Capabilities(
    devices=frozenset({"cuda", "interpreter"}),
    bits=frozenset(LUT_BITS),
    dtypes=_HALF | {torch.float32, torch.float64},
)

Strategy = Literal["auto", "fused", "tiled"]


class TritonLutBackend:
    """``x @ W.T`` and ``g @ W`` for LutFormat weights; see the module docstring.

    ``strategy`` forces fused or tiled (benchmarks, tests); ``tile_bytes`` bounds the dense
    row block the tiled path materializes.
    """

    name = "triton"

    def __init__(self, lut_format: LutFormatFn, *, strategy: Strategy = "auto", tile_bytes: int = 64 << 20):
        if strategy not in ("auto", "fused", "tiled"):
            raise ValueError(f"unknown strategy {strategy!r}; choose one of: auto, fused, tiled")
        self._lut_format = lut_format
        self.strategy = strategy
        self.tile_bytes = tile_bytes

    def linear(self, x: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        fmt = self._lut_format(qweight)
        path = None if fmt is None else self._path(fmt, x)
        if fmt is None or path is None:
            return REFERENCE.linear(x, qweight, materialize)
        from lqmod.kernels.triton import launch

        x2 = x.reshape(-1, fmt.shape[1])
        y = launch.lut_matmul(x2, fmt) if path == "fused" else self._tiled_linear(x2, fmt)
        return y.reshape(*x.shape[:-1], fmt.shape[0])

    def linear_t(self, g: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        fmt = self._lut_format(qweight)
        path = None if fmt is None else self._path(fmt, g)
        if fmt is None or path is None:
            return REFERENCE.linear_t(g, qweight, materialize)
        from lqmod.kernels.triton import launch

        g2 = g.reshape(-1, fmt.shape[0])
        out = launch.lut_matmul_t(g2, fmt) if path == "fused" else self._tiled_linear_t(g2, fmt)
        return out.reshape(*g.shape[:-1], fmt.shape[1])

    # -- choice ------------------------------------------------------------------------

    def _path(self, fmt: LutFormat, t: torch.Tensor) -> Literal["fused", "tiled"] | None:
        kind = device_kind(t.device)
        fused_reason = FUSED.unsupported(fmt, kind, t.dtype)
        tiled_reason = TILED.unsupported(fmt, kind, t.dtype)
        if self.strategy == "fused" and fused_reason is not None:
            raise ValueError(f"fused Triton kernel cannot run this weight: {fused_reason}")
        if self.strategy == "tiled" and tiled_reason is not None:
            raise ValueError(f"tiled Triton kernel cannot run this weight: {tiled_reason}")
        if self.strategy != "tiled" and fused_reason is None:
            return "fused"
        return "tiled" if tiled_reason is None else None

    # -- tiled fallback ----------------------------------------------------------------

    def _row_blocks(self, fmt: LutFormat, dtype: torch.dtype) -> list[tuple[int, int]]:
        n, k = fmt.shape
        per = max(1, self.tile_bytes // (k * torch.finfo(dtype).bits // 8))
        return [(r, min(r + per, n)) for r in range(0, n, per)]

    def _tiled_linear(self, x: torch.Tensor, fmt: LutFormat) -> torch.Tensor:
        from lqmod.kernels.triton import launch

        blocks = self._row_blocks(fmt, x.dtype)
        if len(blocks) == 1:
            return x @ launch.lut_dequant(fmt, x.dtype).t()
        y = torch.empty((x.shape[0], fmt.shape[0]), device=x.device, dtype=x.dtype)
        for r0, r1 in blocks:
            y[:, r0:r1] = x @ launch.lut_dequant(fmt, x.dtype, (r0, r1)).t()
        return y

    def _tiled_linear_t(self, g: torch.Tensor, fmt: LutFormat) -> torch.Tensor:
        from lqmod.kernels.triton import launch

        blocks = self._row_blocks(fmt, g.dtype)
        if len(blocks) == 1:
            return g @ launch.lut_dequant(fmt, g.dtype)
        # Every row block adds a partial sum over N: keep the running sum in float32 so
        # half-precision inputs are not rounded once per block.
        acc_dtype = torch.float32 if g.dtype in _HALF else g.dtype
        out = torch.zeros((g.shape[0], fmt.shape[1]), device=g.device, dtype=acc_dtype)
        for r0, r1 in blocks:
            out += g[:, r0:r1] @ launch.lut_dequant(fmt, g.dtype, (r0, r1))
        return out.to(g.dtype)
