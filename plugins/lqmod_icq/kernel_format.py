"""icq weights as a :class:`~lqmod.kernels.formats.LutFormat`: the base's format plus the shift.

A block of icq is one LUT group of its base, and the shift is added after the table lookup and
the group scale, so it is exactly LutFormat's additive per-group offset: ``zeros = base zeros
(or 0) + tau``. The CPU (native) and Triton LUT kernels thus serve icq unchanged, with no
extra pass over the weight.
"""

from __future__ import annotations

from lqmod.kernels.formats import LutFormat
from lqmod.types import QuantizedWeight
from lqmod_icq.config import base_spec
from lqmod_icq.quantizer import base_qweight, shifts

__all__ = ["lut_format"]


def lut_format(qweight: QuantizedWeight) -> LutFormat | None:
    spec = base_spec(qweight.config)
    if spec.lut_format is None:
        return None
    fmt = spec.lut_format(base_qweight(qweight))
    if fmt is None or fmt.g_idx is not None:
        return None
    tau = shifts(qweight).to(fmt.scales.device).view(fmt.scales.shape)
    zeros = tau if fmt.zeros is None else fmt.zeros + tau
    return LutFormat(fmt.shape, fmt.bits, fmt.codes, fmt.table, fmt.scales, fmt.group_size, zeros=zeros.contiguous())
