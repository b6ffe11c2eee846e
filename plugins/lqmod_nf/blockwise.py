"""Block-wise absmax quantization onto a code table, with optional double quantization.

The weight is read row-major in blocks of ``blocksize`` consecutive values of one row; each
block is scaled by its absolute maximum and every value rounded to the nearest table entry.
With double quantization the float32 absmax values are themselves quantized: their mean is
subtracted, then they are coded in 8 bits against the dynamic map with one float32 scale per
``dq_blocksize`` of them (QLoRA, section 3).
"""

from __future__ import annotations

import torch

from lqmod_nf.codebooks import dynamic_map, nearest_code


def absmax_codes(
    values: torch.Tensor, table: torch.Tensor, blocksize: int, *, reciprocal: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int64, flat) and float32 absmax per block of a flat float tensor.

    bitsandbytes scales 4-bit blocks by multiplying with the reciprocal and 8-bit blocks by
    dividing; the two differ in the last ulp, so both are offered to stay bit-exact.
    """
    blocks = values.float().reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=1).values
    safe = absmax.clamp(min=1e-38).unsqueeze(1)
    scaled = blocks * (1.0 / safe) if reciprocal else blocks / safe
    return nearest_code(torch.clamp(scaled, -1, 1).reshape(-1), table), absmax


def quantize_absmax(absmax: torch.Tensor, dq_blocksize: int) -> dict[str, torch.Tensor]:
    """Double quantization of the per-block scales: uint8 codes, float32 scales, an offset."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    pad = (-n) % dq_blocksize
    padded = torch.cat([centred, centred.new_zeros(pad)]) if pad else centred
    codes, scale2 = absmax_codes(padded, dynamic_map(absmax.device), dq_blocksize, reciprocal=False)
    return {
        "absmax_codes": codes[:n].to(torch.uint8),
        "absmax_scale": scale2,
        "absmax_offset": offset.reshape(1),
    }


def dequantize_absmax(tensors: dict[str, torch.Tensor], dq_blocksize: int) -> torch.Tensor:
    codes = tensors["absmax_codes"].long()
    n = codes.numel()
    values = dynamic_map(codes.device)[codes]
    scale = tensors["absmax_scale"].repeat_interleave(dq_blocksize)[:n]
    return values * scale + tensors["absmax_offset"]
