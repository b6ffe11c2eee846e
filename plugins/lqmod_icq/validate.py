"""The ``icq`` quantizer's ``validate`` hook: the base weight through its own quantizer's checks,
and the stored shifts against the block count the config implies."""

from __future__ import annotations

import math

import torch

from lqmod.quantize import validate_qweight
from lqmod.types import QuantizedWeight, TensorLayout, check_tensor_layout
from lqmod_icq.config import ICQConfig, base_spec
from lqmod_icq.quantizer import BASE_PREFIX, base_qweight, group_size
from lqmod_icq.search import TAU_LEVELS

__all__ = ["shift_layout", "validate"]


def shift_layout(cfg: ICQConfig, shape: tuple[int, int]) -> TensorLayout:
    """The shift tensors stored for ``cfg`` and ``shape``."""
    n_blocks = shape[0] * shape[1] // group_size(cfg, shape[1])
    return {
        "tau_codes": ((n_blocks,), torch.int8),
        "tau_scale": ((math.ceil(n_blocks / cfg.tau_groupsize),), torch.float32),
    }


def validate(qweight: QuantizedWeight, cfg: ICQConfig) -> None:
    base = base_qweight(qweight)
    if not base.tensors:
        raise ValueError(f"no base ({cfg.base}) tensors {BASE_PREFIX}* are stored")
    validate_qweight(base_spec(cfg), base, name=f"base ({cfg.base})")
    own = QuantizedWeight(
        qweight.quantizer,
        qweight.config,
        qweight.shape,
        {k: v for k, v in qweight.tensors.items() if not k.startswith(BASE_PREFIX)},
    )
    check_tensor_layout(own, shift_layout(cfg, qweight.shape))
    codes, scale = qweight.tensors["tau_codes"], qweight.tensors["tau_scale"]
    if codes.numel() and int(codes.min()) < -TAU_LEVELS:
        raise ValueError(f"tau_codes hold {int(codes.min())}; icq writes codes in [-{TAU_LEVELS}, {TAU_LEVELS}]")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError("tau_scale must be finite and >= 0")
