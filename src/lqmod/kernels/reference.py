"""Plain-torch backend: materialize the whole weight, matmul, drop it.

The dense weight lives only for the duration of one matmul; nothing here is saved for
autograd (see :mod:`lqmod.autograd`). :func:`materialize_lut` is the torch definition of a
:class:`~lqmod.kernels.formats.LutFormat`, the oracle the Triton kernels are tested against.
"""

from __future__ import annotations

import math

import torch

from lqmod.kernels.formats import LutFormat
from lqmod.packing import unpack_codes
from lqmod.types import Materialize, QuantizedWeight

__all__ = ["REFERENCE", "ReferenceBackend", "materialize_lut"]


class ReferenceBackend:
    name = "torch"

    def linear(self, x: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        weight = materialize(qweight, x.dtype)
        return torch.matmul(x, weight.t())

    def linear_t(self, g: torch.Tensor, qweight: QuantizedWeight, materialize: Materialize) -> torch.Tensor:
        weight = materialize(qweight, g.dtype)
        return torch.matmul(g, weight)


REFERENCE = ReferenceBackend()


def materialize_lut(
    fmt: LutFormat,
    dtype: torch.dtype = torch.float32,
    rows: tuple[int, int] | None = None,
    *,
    exact: bool = False,
) -> torch.Tensor:
    """Dense rows ``rows[0]:rows[1]`` (default: all) of ``fmt``'s weight, in ``dtype``.

    The arithmetic runs in float32 and is cast once at the end, as :class:`LutFormat`
    prescribes; ``exact=True`` runs it in float64 instead, for references.
    """
    out_f, in_f = fmt.shape
    r0, r1 = rows if rows is not None else (0, out_f)
    if not 0 <= r0 <= r1 <= out_f:
        raise ValueError(f"rows {rows} out of range for {out_f} output rows")
    math_dtype = torch.float64 if exact else torch.float32
    codes = _codes(fmt, r0 * in_f, r1 * in_f).view(r1 - r0, in_f)
    groups = (
        fmt.g_idx.long()
        if fmt.g_idx is not None
        else torch.arange(in_f, device=fmt.device) // fmt.group_size
    )
    weight = fmt.table.to(math_dtype)[codes] * fmt.scales[r0:r1].to(math_dtype)[:, groups]
    if fmt.zeros is not None:
        weight = weight + fmt.zeros[r0:r1].to(math_dtype)[:, groups]
    return weight.to(dtype)


def _codes(fmt: LutFormat, start: int, stop: int) -> torch.Tensor:
    # Unpack from the last byte-aligned code at or before `start`: for 3 bits a row may begin
    # mid-byte, and 8 codes (3 bytes) is the shortest run that starts on a byte again.
    per_run = 8 // math.gcd(8, fmt.bits)
    aligned = start - start % per_run
    first_byte = aligned * fmt.bits // 8
    codes = unpack_codes(fmt.codes.reshape(-1)[first_byte:], fmt.bits, stop - aligned)
    return codes[start - aligned :]
