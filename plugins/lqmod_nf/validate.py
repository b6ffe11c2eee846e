"""The NF quantizer's ``validate`` hook: a loaded weight's tensors against its config."""

from __future__ import annotations

import torch

from lqmod.packing import packed_nbytes
from lqmod.types import QuantizedWeight, TensorLayout, check_tensor_layout
from lqmod_nf.quantizer import NFConfig, _check_fits

__all__ = ["layout", "validate"]


def layout(cfg: NFConfig, shape: tuple[int, int]) -> TensorLayout:
    """The tensors :func:`lqmod_nf.quantizer.quantize` stores for ``cfg`` and ``shape``."""
    _check_fits(cfg, shape[1])
    n = shape[0] * shape[1]
    blocks = n // cfg.blocksize
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"codes": ((packed_nbytes(n, cfg.bits),), torch.uint8)}
    if cfg.double_quant:
        expected["absmax_codes"] = ((blocks,), torch.uint8)
        expected["absmax_scale"] = ((-(-blocks // cfg.dq_blocksize),), torch.float32)
        expected["absmax_offset"] = ((1,), torch.float32)
    else:
        expected["absmax"] = ((blocks,), torch.float32)
    return expected


def validate(qweight: QuantizedWeight, cfg: NFConfig) -> None:
    check_tensor_layout(qweight, layout(cfg, qweight.shape))
