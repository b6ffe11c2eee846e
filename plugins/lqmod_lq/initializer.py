"""The ``lq-lora`` initializer: the layer's own quantizer becomes the base of an LQ decomposition.

The layer is quantized as usual (say NF3); then ``W ~ Q + L1 L2`` is computed with that very
quantizer and config for Q, and the trainable adapter starts at the factors:
``scaling * B A = L1 L2`` with ``B = L1 / sqrt(scaling)``, ``A = L2 / sqrt(scaling)``. So at
step 0 the adapted layer computes ``x (Q + L1 L2)^T``: the adapter carries the part of W the
quantizer would have lost, instead of starting at zero next to a lossy base.

The LoRA rank *is* the decomposition rank. The factors are float32, like the adapters.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from pydantic import Field

from lqmod.config import InitializerConfig, LoRAConfig
from lqmod.plugins import get_registry
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.types import InitResult, LayerStats, Materialize, QuantizedWeight
from lqmod_lq.decompose import decompose

__all__ = ["LQLoRAInitConfig", "initialize"]


class LQLoRAInitConfig(InitializerConfig):
    """Settings of the decomposition; its rank is the LoRA rank ``lora.r``."""

    max_iters: int = Field(50, ge=1, le=1000)
    tol: float = Field(1e-4, ge=0.0, lt=1.0)
    fisher_weighted: bool = Field(False, description="weight the objective with stats.fisher (then required)")
    oversample: int = Field(10, ge=0, le=1024)
    power_iters: int = Field(2, ge=0, le=32)
    seed: int = Field(0, ge=0)


def initialize(
    *,
    weight: torch.Tensor | None,
    qweight: QuantizedWeight,
    materialize: Materialize,
    lora: LoRAConfig,
    config: LQLoRAInitConfig,
    stats: LayerStats | None,
    generator: torch.Generator | None,
) -> InitResult:
    if weight is None:
        raise QuantizationError("lq-lora initializer needs the dense weight to decompose; it was not given")
    shape = (qweight.shape[0], qweight.shape[1])
    if lora.r >= min(shape):
        raise QuantizationError(
            f"lq-lora: LoRA rank r={lora.r} is the decomposition rank and must be below "
            f"min(out_features, in_features)={min(shape)} of this {shape} layer"
        )
    fisher = None
    if config.fisher_weighted:
        if stats is None or stats.fisher is None:
            raise QuantizationError(
                "lq-lora with fisher_weighted=True needs stats.fisher for every adapted layer "
                "(lqmod.calibration.diagonal_fisher); pass stats= to quantize_model or set fisher_weighted=False"
            )
        fisher = stats.fisher
    spec = get_registry().quantizer(qweight.quantizer)
    base_cfg = spec.config_model.model_validate(qweight.config)

    def quantize_base(residual: torch.Tensor) -> QuantizedWeight:
        return quantize_weight(spec, residual, base_cfg, stats, name=f"lq-lora base ({spec.name})")

    result = decompose(
        weight, lora.r, quantize_base, materialize, fisher=fisher, max_iters=config.max_iters, tol=config.tol,
        oversample=config.oversample, power_iters=config.power_iters, seed=config.seed, factors="fp32",
    )  # fmt: skip
    root = math.sqrt(lora.scaling)
    new_q = dataclasses.replace(result.qweight, dtype=qweight.dtype)
    return InitResult(lora_a=result.l2 / root, lora_b=result.l1 / root, qweight=new_q)
