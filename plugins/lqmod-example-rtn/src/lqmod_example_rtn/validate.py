"""The RTN quantizer's ``validate`` hook: lqmod calls it on every weight read back from a
checkpoint, so a config that does not describe the stored tensors (edited bits, another
group size) is refused instead of being materialized into garbage."""

from __future__ import annotations

import torch

from lqmod.packing import packed_nbytes
from lqmod.types import QuantizedWeight, TensorLayout, check_tensor_layout
from lqmod_example_rtn.quantizer import RTNConfig, group_size_for

__all__ = ["layout", "validate"]


def layout(cfg: RTNConfig, shape: tuple[int, int]) -> TensorLayout:
    """The tensors :func:`lqmod_example_rtn.quantizer.quantize` stores for ``cfg`` and ``shape``."""
    out_f, in_f = shape
    groups = in_f // group_size_for(cfg, in_f)
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "codes": ((packed_nbytes(out_f * in_f, cfg.bits),), torch.uint8),
        "scales": ((out_f, groups), getattr(torch, cfg.scale_dtype)),
    }
    if not cfg.symmetric:
        expected["zeros"] = ((packed_nbytes(out_f * groups, cfg.bits),), torch.uint8)
    return expected


def validate(qweight: QuantizedWeight, cfg: RTNConfig) -> None:
    check_tensor_layout(qweight, layout(cfg, qweight.shape))
