"""Statistics of the codes a LUT-style weight stores: per-block codes and their entropy.

Shared by the ICQ plug-in (which maximises the entropy) and the benchmark that reports it, so
both measure the same quantity.
"""

from __future__ import annotations

import torch

from lqmod.kernels.formats import LutFormat
from lqmod.packing import unpack_codes

__all__ = ["block_entropy", "lut_block_codes"]


def lut_block_codes(fmt: LutFormat) -> torch.Tensor:
    """(n_blocks, group) int64: the codes of ``fmt``, one row per group of consecutive weights.

    Act-order formats (``g_idx``) scatter a group's columns, so they have no such blocks.
    """
    if fmt.g_idx is not None:
        raise ValueError("a LutFormat with g_idx (act-order) has no blocks of consecutive weights")
    out_f, in_f = fmt.shape
    return unpack_codes(fmt.codes, fmt.bits, out_f * in_f).long().view(-1, fmt.group_size)


def block_entropy(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Shannon entropy (bits, float64) of the code histogram of every row of ``codes``."""
    counts = torch.zeros(codes.shape[0], 2**bits, dtype=torch.float64, device=codes.device)
    counts.scatter_add_(1, codes, torch.ones_like(codes, dtype=torch.float64))
    p = counts / codes.shape[1]
    logs = torch.where(p > 0, p.log2(), torch.zeros_like(p))
    return -(p * logs).sum(dim=1)
