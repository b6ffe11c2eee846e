"""The NormalFloat quantizer: quantize, materialize and exact storage cost."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lqmod.config import QuantizerConfig
from lqmod.packing import decode_codes, pack_codes, packed_nbytes
from lqmod.quantize import QuantizationError
from lqmod.types import LayerStats, QuantizedWeight
from lqmod_nf.blockwise import absmax_codes, dequantize_absmax, quantize_absmax
from lqmod_nf.codebooks import nf_table

NAME = "nf"
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class NFConfig(QuantizerConfig):
    """NormalFloat (QLoRA) quantization. ``bits=4, blocksize=64, double_quant=True`` is NF4 as in QLoRA."""

    bits: Literal[2, 3, 4] = 4
    blocksize: Literal[16, 32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    double_quant: bool = True
    dq_blocksize: int = Field(256, ge=16, le=4096, description="absmax values per second-level scale")


def _check_fits(cfg: NFConfig, in_f: int) -> None:
    # Blocks never straddle rows, so that a row slice of the codes is a valid weight too.
    if in_f % cfg.blocksize:
        fits = [b for b in BLOCK_SIZES if in_f % b == 0]
        raise QuantizationError(
            f"in_features={in_f} is not a multiple of blocksize={cfg.blocksize}; "
            f"block sizes that fit this matrix: {fits or 'none'}"
        )


def quantize(weight: torch.Tensor, cfg: NFConfig, stats: LayerStats | None = None) -> QuantizedWeight:
    out_f, in_f = weight.shape
    _check_fits(cfg, in_f)
    table = nf_table(cfg.bits, weight.device)
    codes, absmax = absmax_codes(weight.reshape(-1), table, cfg.blocksize)
    tensors = {"codes": pack_codes(codes, cfg.bits)}
    if cfg.double_quant:
        tensors.update(quantize_absmax(absmax, cfg.dq_blocksize))
    else:
        tensors["absmax"] = absmax
    return QuantizedWeight(NAME, cfg.model_dump(), (out_f, in_f), tensors, dtype=weight.dtype)


def block_scales(qweight: QuantizedWeight) -> torch.Tensor:
    """The float32 absmax of every block (after double quantization, if any)."""
    cfg = qweight.config
    if cfg["double_quant"]:
        return dequantize_absmax(qweight.tensors, int(cfg["dq_blocksize"]))
    return qweight.tensors["absmax"]


def materialize(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    cfg = qweight.config
    out_f, in_f = qweight.shape
    packed = qweight.tensors["codes"]
    # table[code] through a byte table (lqmod.packing.decode_codes), then the block scale in
    # place: the same float32 products as table[codes] * absmax, without int64 codes.
    table = nf_table(int(cfg["bits"]), packed.device)
    values = decode_codes(packed, int(cfg["bits"]), out_f * in_f, table).view(-1, int(cfg["blocksize"]))
    dense = values.mul_(block_scales(qweight).unsqueeze(1))
    return dense.to(dtype).view(out_f, in_f)


def bits_per_param(cfg: NFConfig, shape: tuple[int, int]) -> float:
    # Refuses what quantize refuses, so an allocator never prices an option it cannot build.
    _check_fits(cfg, shape[1])
    n = shape[0] * shape[1]
    blocks = n // cfg.blocksize
    bits = packed_nbytes(n, cfg.bits) * 8
    if cfg.double_quant:
        groups = -(-blocks // cfg.dq_blocksize)
        bits += blocks * 8 + groups * 32 + 32
    else:
        bits += blocks * 32
    return bits / n


def options() -> list[NFConfig]:
    return [
        NFConfig(bits=b, blocksize=bs, double_quant=dq)
        for b in (2, 3, 4)
        for bs in (32, 64, 128, 256)
        for dq in (False, True)
    ]
