"""NF-k weights as a :class:`~lqmod.kernels.formats.LutFormat`, for the Triton kernels.

An NF block is ``blocksize`` consecutive values of one row (``quantize`` requires
``in_features % blocksize == 0``), so blocks are exactly LutFormat's column groups:
``w = nf_table[code] * absmax[block]``, no offset, no act-order.
"""

from __future__ import annotations

from functools import cache

import torch

from lqmod.kernels.formats import LutFormat
from lqmod.kernels.native import available as native_available
from lqmod.kernels.native import lut_materialize_raw
from lqmod.types import QuantizedWeight
from lqmod_nf.codebooks import dynamic_map, nf_table

__all__ = ["lut_format"]


def lut_format(qweight: QuantizedWeight) -> LutFormat:
    """The LutFormat of an NF weight; double-quantized scales are decoded here, once per call.

    Decoding the absmax (1/blocksize of the weight's values) in torch keeps the kernel's
    inner loop to one table and one scale lookup; the float32 scales it reads instead of the
    8-bit codes add 24/blocksize bits per weight of traffic (0.375 at blocksize 64).
    """
    cfg = qweight.config
    out_f, in_f = qweight.shape
    bits, blocksize = int(cfg["bits"]), int(cfg["blocksize"])
    return LutFormat(
        shape=(out_f, in_f),
        bits=bits,
        codes=qweight.tensors["codes"],
        table=_on_device("nf", bits, qweight.device),
        scales=_block_scales(qweight).reshape(out_f, in_f // blocksize),
        group_size=blocksize,
    )


def _block_scales(qweight: QuantizedWeight) -> torch.Tensor:
    # Same arithmetic as blockwise.dequantize_absmax (the NF tests hold the two bit-exact),
    # but with the code map cached per device: that function copies the map host-to-device
    # on every call, a synchronising transfer in every forward and backward on a GPU.
    tensors = qweight.tensors
    if not qweight.config["double_quant"]:
        return tensors["absmax"].float()
    if tensors["absmax_codes"].device.type == "cpu" and native_available():
        return _block_scales_native(qweight)
    codes = tensors["absmax_codes"].long()
    scale = tensors["absmax_scale"].repeat_interleave(int(qweight.config["dq_blocksize"]))[: codes.numel()]
    return _on_device("dynamic", 8, codes.device)[codes] * scale + tensors["absmax_offset"]


def _block_scales_native(qweight: QuantizedWeight) -> torch.Tensor:
    # The second-level decode is itself a LUT format: 8-bit codes, the dynamic map, one
    # scale per dq_blocksize codes and the mean as offset, so the compiled LUT kernel runs it
    # with the same float32 operations (multiply, then add) as dequantize_absmax.
    tensors = qweight.tensors
    codes = tensors["absmax_codes"]
    scale = tensors["absmax_scale"].reshape(1, -1)
    offset = tensors["absmax_offset"].reshape(1, 1).expand_as(scale)
    n = codes.numel()
    out = lut_materialize_raw(
        codes, 8, (1, n), _on_device("dynamic", 8, codes.device), scale,
        int(qweight.config["dq_blocksize"]), zeros=offset,
    )  # fmt: skip
    return out.reshape(n)


@cache
def _on_device(kind: str, bits: int, device: torch.device) -> torch.Tensor:
    return nf_table(bits, device) if kind == "nf" else dynamic_map(device)
