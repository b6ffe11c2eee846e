"""RTN weights as a :class:`~lqmod.kernels.formats.LutFormat`, so lqmod's Triton kernels run them.

RTN is the integer case of "code -> table -> per-group scale and offset":

* asymmetric ``(q - z) * s``:      table ``0 .. 2^b - 1``, scales ``s``, offsets ``-z * s``;
* symmetric ``(q - 2^(b-1)) * s``: table ``-2^(b-1) .. 2^(b-1) - 1``, scales ``s``, no offset.

With float16 scales both forms give the very bits :func:`~lqmod_example_rtn.quantizer.materialize`
gives (every product is exact in float32); with float32 scales they agree to float32 rounding.
"""

from __future__ import annotations

from functools import cache

import torch

from lqmod.kernels.formats import LutFormat
from lqmod.kernels.native import available as native_available
from lqmod.kernels.native import lut_materialize_raw
from lqmod.packing import unpack_codes
from lqmod.types import QuantizedWeight

__all__ = ["lut_format"]


def lut_format(qweight: QuantizedWeight) -> LutFormat:
    cfg = qweight.config
    bits = int(cfg["bits"])
    out_f, in_f = qweight.shape
    group = in_f if int(cfg["group_size"]) == -1 else int(cfg["group_size"])
    symmetric = bool(cfg["symmetric"])
    scales = qweight.tensors["scales"].float()
    zeros = None
    if not symmetric and scales.device.type == "cpu" and native_available():
        # The offsets -z * s are themselves a LUT weight (z's packed codes, table -arange, one
        # scale each): the compiled kernel decodes them without unpacking z to int64 first.
        shape = (scales.shape[0], scales.shape[1])
        zeros = lut_materialize_raw(
            qweight.tensors["zeros"], bits, shape, _table(bits, False, scales.device, True), scales, 1
        )
    elif not symmetric:
        # 1/group of the weight's size, decoded per call, so the kernel reads float offsets.
        points = unpack_codes(qweight.tensors["zeros"], bits, scales.numel()).view_as(scales)
        zeros = -points.float() * scales
    return LutFormat(
        shape=(out_f, in_f),
        bits=bits,
        codes=qweight.tensors["codes"],
        table=_table(bits, symmetric, qweight.device),
        scales=scales,
        group_size=group,
        zeros=zeros,
    )


@cache
def _table(bits: int, symmetric: bool, device: torch.device, negated: bool = False) -> torch.Tensor:
    # Cached per device: no host-to-device copy in every forward and backward.
    offset = 2 ** (bits - 1) if symmetric else 0
    table = torch.arange(2**bits, dtype=torch.float32) - offset
    return (-table if negated else table).to(device)
