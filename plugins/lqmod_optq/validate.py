"""The OPTQ quantizer's ``validate`` hook: a loaded weight's tensors against its config."""

from __future__ import annotations

import torch

from lqmod.packing import packed_nbytes
from lqmod.types import QuantizedWeight, TensorLayout, check_tensor_layout
from lqmod_optq.config import OPTQConfig, n_groups_for, stores_g_idx

__all__ = ["layout", "validate"]


def layout(cfg: OPTQConfig, shape: tuple[int, int]) -> TensorLayout:
    """The tensors :func:`lqmod_optq.quantizer.quantize` stores for ``cfg`` and ``shape``."""
    out_f, in_f = shape
    groups = n_groups_for(cfg, in_f)
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "codes": ((packed_nbytes(out_f * in_f, cfg.bits),), torch.uint8),
    }
    if cfg.scale_bits == 8:
        expected["scale_codes"] = ((out_f, groups), torch.uint8)
        expected["scale_ref"] = ((1,), torch.float32)
    else:
        expected["scales"] = ((out_f, groups), torch.float16)
    if not cfg.sym:
        expected["zeros"] = ((packed_nbytes(out_f * groups, cfg.bits),), torch.uint8)
    if stores_g_idx(cfg, in_f):
        expected["g_idx"] = ((in_f,), torch.int32)
    return expected


def validate(qweight: QuantizedWeight, cfg: OPTQConfig) -> None:
    check_tensor_layout(qweight, layout(cfg, qweight.shape))
    ref = qweight.tensors.get("scale_ref")
    if ref is not None and not (bool(torch.isfinite(ref).all()) and float(ref[0]) > 0):
        # the byte grid's levels are fractions of it: zero, negative or non-finite levels would be garbage
        raise ValueError(f"scale_ref is {float(ref[0])}; the reference of the byte scales must be finite and > 0")
    g_idx = qweight.tensors.get("g_idx")
    if g_idx is not None and g_idx.numel():
        groups = n_groups_for(cfg, qweight.shape[1])
        low, high = int(g_idx.min()), int(g_idx.max())
        if low < 0 or high >= groups:
            # materialize indexes the scales with g_idx: out of range would read garbage or crash
            raise ValueError(f"g_idx holds groups {low}..{high}; this config has groups 0..{groups - 1}")
