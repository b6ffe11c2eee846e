"""Checked entry points around a quantizer's callables.

Plug-ins implement the math; this module refuses bad input (non-finite weights, wrong
ranks, invalid configs) with messages that say what is wrong and what is accepted, and
checks that what a plug-in returned is consistent, so every quantizer gets the same
guarantees for free.
"""

from __future__ import annotations

from typing import Any

import torch

from lqmod.config import QuantizerConfig, validate_config
from lqmod.types import LayerStats, QuantizedWeight, QuantizerSpec

__all__ = ["QuantizationError", "check_weight", "quantize_weight", "resolve_config"]


class QuantizationError(ValueError):
    """The weight cannot be quantized as asked; the message says why and what would work."""


def resolve_config(spec: QuantizerSpec, config: Any) -> QuantizerConfig:
    cfg: QuantizerConfig = validate_config(spec.config_model, config, what=f"{spec.name} config")
    return cfg


def check_weight(weight: torch.Tensor, *, name: str = "weight") -> None:
    if weight.ndim != 2:
        raise QuantizationError(
            f"{name}: expected a 2-D (out_features, in_features) matrix, got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise QuantizationError(f"{name}: expected a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise QuantizationError(f"{name}: empty matrix of shape {tuple(weight.shape)}")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        count = int((~finite).sum())
        raise QuantizationError(
            f"{name}: {count} non-finite value(s) (NaN or Inf), first at index {tuple(bad)}; "
            "only finite weights can be quantized"
        )


def quantize_weight(
    spec: QuantizerSpec,
    weight: torch.Tensor,
    config: Any = None,
    stats: LayerStats | None = None,
    *,
    name: str = "weight",
) -> QuantizedWeight:
    """Validate, quantize with ``spec``, and check the result's shape and bookkeeping."""
    cfg = resolve_config(spec, config)
    check_weight(weight, name=name)
    missing = [s for s in sorted(spec.needs) if stats is None or getattr(stats, s, None) is None]
    if missing:
        raise QuantizationError(
            f"{name}: quantizer {spec.name!r} needs calibration statistics {missing}; "
            "pass calibration data (see lqmod.calibration)"
        )
    with torch.no_grad():
        try:
            qweight = spec.quantize(weight.detach(), cfg, stats)
        except QuantizationError as exc:
            raise QuantizationError(f"{name}: {exc}") from None
    if tuple(qweight.shape) != tuple(weight.shape):
        raise RuntimeError(
            f"quantizer {spec.name!r} returned shape {qweight.shape} for a weight of shape "
            f"{tuple(weight.shape)}: a plug-in bug"
        )
    if qweight.quantizer != spec.name:
        raise RuntimeError(f"quantizer {spec.name!r} labelled its output {qweight.quantizer!r}: a plug-in bug")
    return qweight
