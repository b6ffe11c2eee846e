"""OPTQ weights as a :class:`~lqmod.kernels.formats.LutFormat`, so lqmod's Triton kernels run them.

``(q - z) * s`` is "code -> table -> per-group scale and offset" with an integer table:

* asymmetric: table ``0 .. 2^b - 1``, scales ``s``, offsets ``-z * s``;
* symmetric:  table ``-2^(b-1) .. 2^(b-1) - 1``, scales ``s``, no offset;
* act-order:  the stored ``g_idx`` is LutFormat's ``g_idx`` as it is.

With float16 scales every product is exact in float32, so the kernels' weight is
:func:`~lqmod_optq.quantizer.materialize`'s bit for bit.
"""

from __future__ import annotations

from functools import cache

import torch

from lqmod.kernels.formats import LutFormat
from lqmod.kernels.native import available as native_available
from lqmod.kernels.native import lut_materialize_raw
from lqmod.types import QuantizedWeight
from lqmod_optq.quantizer import group_scales, zero_points

__all__ = ["lut_format"]


def lut_format(qweight: QuantizedWeight) -> LutFormat:
    cfg = qweight.config
    bits = int(cfg["bits"])
    out_f, in_f = qweight.shape
    group = in_f if int(cfg["group_size"]) == -1 else int(cfg["group_size"])
    sym = bool(cfg["sym"])
    scales = group_scales(qweight).float()
    if sym:
        zeros = None
    elif scales.device.type == "cpu" and native_available():
        # The offsets -z * s are themselves a LUT weight: z's packed codes, table -arange, one
        # scale each; the compiled kernel decodes them without unpacking z to int64 first.
        shape = (scales.shape[0], scales.shape[1])
        zeros = lut_materialize_raw(
            qweight.tensors["zeros"], bits, shape, _table(bits, False, scales.device, True), scales, 1
        )
    else:
        zeros = -zero_points(qweight).float() * scales
    return LutFormat(
        shape=(out_f, in_f),
        bits=bits,
        codes=qweight.tensors["codes"],
        table=_table(bits, sym, qweight.device),
        scales=scales,
        group_size=group,
        # 1/group of the weight's size, decoded per call so the kernel reads float offsets.
        zeros=zeros,
        g_idx=qweight.tensors.get("g_idx"),
    )


@cache
def _table(bits: int, sym: bool, device: torch.device, negated: bool = False) -> torch.Tensor:
    # Cached per device: no host-to-device copy in every forward and backward.
    offset = 2 ** (bits - 1) if sym else 0
    table = torch.arange(2**bits, dtype=torch.float32) - offset
    return (-table if negated else table).to(device)
