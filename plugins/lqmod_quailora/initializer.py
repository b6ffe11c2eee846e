"""The ``quailora`` initializer: adapters that cancel the calibrated quantization error at step 0.

The layer is quantized by its own quantizer as usual (any registered one) and that base ``Q``
is kept as it is; only the adapter's starting point changes: ``scaling * B A = L`` with ``L``
the rank-r minimiser of ``||(W - Q - L) X^T||_F`` over the calibration activations (the
layer's ``hessian`` statistic, damped; :mod:`lqmod_quailora.solve`). Nothing else is stored,
so finetuning memory is that of plain QLoRA.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from lqmod.config import InitializerConfig, LoRAConfig
from lqmod.quantize import QuantizationError
from lqmod.types import InitResult, LayerStats, Materialize, QuantizedWeight
from lqmod_quailora.solve import LowRank, als_lowrank, balance, damped_hessian, exact_lowrank

__all__ = ["NAME", "QuAILoRAConfig", "initialize", "solve_layer"]

NAME = "quailora"


class QuAILoRAConfig(InitializerConfig):
    """How the rank-r correction is found; its rank is the LoRA rank ``lora.r``."""

    method: Literal["als", "exact"] = Field(
        "als", description="als: QuAILoRA's alternating least squares; exact: closed-form minimiser (CLoQ/QERA)"
    )
    damp: float = Field(
        0.01, gt=0.0, le=10.0, description="ridge added to H, relative to mean(diag H) (GPTQ's percdamp)"
    )
    max_iters: int = Field(20, ge=1, le=10_000, description="cap on ALS iterations")
    tol: float = Field(1e-6, ge=0.0, lt=1.0, description="ALS stops when an iteration improves less (relative)")


def solve_layer(
    weight: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor, rank: int, config: QuAILoRAConfig
) -> LowRank:
    """``L = b @ a`` for one layer (float64, on ``weight``'s device), by ``config.method``."""
    e = weight.to(torch.float64) - q.to(device=weight.device, dtype=torch.float64)
    hd = damped_hessian(hessian.to(weight.device), config.damp)
    if config.method == "exact":
        return exact_lowrank(e, hd, rank)
    return als_lowrank(e, hd, rank, max_iters=config.max_iters, tol=config.tol)


def initialize(
    *,
    weight: torch.Tensor | None,
    qweight: QuantizedWeight,
    materialize: Materialize,
    lora: LoRAConfig,
    config: QuAILoRAConfig,
    stats: LayerStats | None,
    generator: torch.Generator | None,
) -> InitResult:
    if weight is None:
        raise QuantizationError("quailora initializer needs the dense weight W to fit W - Q; it was not given")
    if stats is None or stats.hessian is None:
        raise QuantizationError(
            "quailora initializer needs stats.hessian (X^T X of the layer's calibration inputs) for every adapted "
            "layer: lqmod.calibration.collect_hessians(model, names, batches), or --calib-text on the command line"
        )
    out_f, in_f = qweight.shape
    if tuple(stats.hessian.shape) != (in_f, in_f):
        raise QuantizationError(
            f"quailora: stats.hessian is {tuple(stats.hessian.shape)}, this ({out_f}, {in_f}) layer needs "
            f"({in_f}, {in_f})"
        )
    with torch.no_grad():
        q = materialize(qweight, torch.float32)
        low = solve_layer(weight.detach(), q, stats.hessian, lora.r, config)
        b, a = balance(low.b, low.a)
        k = b.shape[1]
        if k < lora.r:  # rank above min(out, in): the extra directions start at zero
            b = torch.cat([b, b.new_zeros(out_f, lora.r - k)], dim=1)
            a = torch.cat([a, a.new_zeros(lora.r - k, in_f)], dim=0)
        root = math.sqrt(lora.scaling)
    return InitResult(lora_a=(a / root).float().contiguous(), lora_b=(b / root).float().contiguous())
