"""The ``lq`` quantizers' ``validate`` hook: the base weight through its own quantizer's checks,
and the stored factors against ``rank`` and ``factor_dtype``."""

from __future__ import annotations

import torch

from lqmod.quantize import validate_qweight
from lqmod.types import QuantizedWeight, TensorLayout, check_tensor_layout
from lqmod_lq.factors import _FLOAT
from lqmod_lq.quantizer import BASE_PREFIX, LQConfig, _base_spec, _check_shape, base_qweight

__all__ = ["factor_layout", "validate"]


def factor_layout(cfg: LQConfig, shape: tuple[int, int]) -> TensorLayout:
    """The factor tensors stored for ``cfg`` (see :mod:`lqmod_lq.factors`)."""
    _check_shape(cfg, shape)
    out_f, in_f = shape
    r = cfg.rank
    if cfg.factor_dtype == "int8":
        return {
            "l1": ((out_f, r), torch.int8),
            "l1_scale": ((r,), torch.float32),
            "l2": ((r, in_f), torch.int8),
            "l2_scale": ((r,), torch.float32),
        }
    dtype = _FLOAT[cfg.factor_dtype]
    return {"l1": ((out_f, r), dtype), "l2": ((r, in_f), dtype)}


def validate(qweight: QuantizedWeight, cfg: LQConfig) -> None:
    base = base_qweight(qweight)
    if not base.tensors:
        raise ValueError(f"no base ({cfg.base}) tensors {BASE_PREFIX}* are stored")
    # The base is an ordinary weight of its quantizer: the same checks the core makes.
    validate_qweight(_base_spec(cfg), base, name=f"base ({cfg.base})")
    factors = QuantizedWeight(
        qweight.quantizer,
        qweight.config,
        qweight.shape,
        {k: v for k, v in qweight.tensors.items() if not k.startswith(BASE_PREFIX)},
    )
    check_tensor_layout(factors, factor_layout(cfg, qweight.shape))
