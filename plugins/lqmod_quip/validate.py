"""The QuIP#-like quantizer's ``validate`` hook: a loaded weight's tensors against its config."""

from __future__ import annotations

import torch

from lqmod.packing import packed_nbytes
from lqmod.types import QuantizedWeight, TensorLayout, check_tensor_layout
from lqmod_quip.codebooks import DIM
from lqmod_quip.quantizer import _SCALE_DTYPES, QuipConfig, _check_shape, _stage_count

__all__ = ["layout", "validate"]


def layout(cfg: QuipConfig, shape: tuple[int, int]) -> TensorLayout:
    """The tensors :func:`lqmod_quip.quantizer.quantize` stores for ``cfg`` and ``shape``."""
    _check_shape(shape)
    m, n = shape
    blocks = n // DIM
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "signs": ((packed_nbytes(m + n, 1),), torch.uint8),
        "scales": ((_stage_count(cfg.bits),), _SCALE_DTYPES[cfg.scale_dtype]),
        "codes": ((2 if cfg.bits == 4 else 1, m, blocks), torch.int16),
    }
    if cfg.bits == 3:
        expected["resid_codes"] = ((m, blocks), torch.uint8)
    return expected


def validate(qweight: QuantizedWeight, cfg: QuipConfig) -> None:
    check_tensor_layout(qweight, layout(cfg, qweight.shape))
    resid = qweight.tensors.get("resid_codes")
    if resid is not None and resid.numel() and int(resid.max()) >= 256:
        raise ValueError("resid_codes index a 256-entry codebook")
