"""Adapters folded into the base: a dense model for plain transformers, or a re-quantized one.

* :func:`merge_to_dense`: every PEFT LoRA/DoRA adapter over a QuantizedLinear merged exactly
  (``materialize(W_q) + dW`` in float32, then cast) into a plain ``nn.Linear``; the result
  has no lqmod layer and no quantization config, so its ``save_pretrained`` output loads
  with plain transformers (and serves anywhere a dense fp16/bf16 checkpoint does).
* :func:`merge_and_requantize`: the merged weight re-quantized with any registered
  quantizer (the layer's own by default), with the error the re-quantization adds reported
  per layer; the result saves and reloads through the ``"lqmod"`` transformers method.
* :func:`dequantize_model`: QuantizedLinear layers back to dense (no adapters involved).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lqmod.config import validate_config
from lqmod.model import replace_module
from lqmod.nn.quantized_linear import QuantizedLinear
from lqmod.plugins import Registry, get_registry
from lqmod.quantize import quantize_weight
from lqmod.types import LayerStats

__all__ = ["MergeReport", "RequantizedLayer", "dequantize_model", "merge_and_requantize", "merge_to_dense"]


@dataclass(frozen=True)
class RequantizedLayer:
    """One merged layer: ``rel_error`` = ||Q(W') - W'|| / ||W'|| for the merged weight ``W'``
    (what re-quantization adds), ``update_ratio`` = ||W' - W_q|| / ||W_q|| (how large the
    merged update was next to the old base: an added error near it erases the finetuning)."""

    name: str
    quantizer: str
    config: dict[str, Any]
    rel_error: float
    update_ratio: float
    bits_per_param: float


@dataclass
class MergeReport:
    layers: list[RequantizedLayer] = field(default_factory=list)

    @property
    def mean_rel_error(self) -> float:
        return sum(r.rel_error for r in self.layers) / max(len(self.layers), 1)

    @property
    def max_rel_error(self) -> float:
        return max((r.rel_error for r in self.layers), default=0.0)


def _merged_weight(layer: Any) -> torch.Tensor:
    """The exact float32 weight a PEFT LoRA layer over a QuantizedLinear computes with: its base,
    with every active, not yet merged adapter (LoRA or DoRA) folded in."""
    base = layer.get_base_layer()
    assert isinstance(base, QuantizedLinear)
    with torch.no_grad():
        weight = base.dequantize(torch.float32)
        if layer.merged:
            return weight  # already folded into (a re-quantized) base
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            if adapter in layer.lora_variant:
                weight = layer.lora_variant[adapter].merge_safe(layer, adapter, weight).float()
            else:
                weight = weight + layer.get_delta_weight(adapter).float().to(weight.device)
    return weight


def _lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    from lqmod.integrations.peft import LoraQuantizedLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraQuantizedLinear)]


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The base transformers model, the remaining PEFT layers (over dense layers) merged."""
    peft_model: Any = model
    if hasattr(peft_model, "merge_and_unload") and hasattr(peft_model, "peft_config"):
        unwrapped: nn.Module = peft_model.merge_and_unload()
        return unwrapped
    return model


def _strip_quantization(model: nn.Module) -> None:
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "is_quantized"):
        setattr(model, "is_quantized", False)  # noqa: B010 - a plain attribute transformers reads
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if config is not None and hasattr(config, "_is_quantized"):
        config._is_quantized = False


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Every QuantizedLinear replaced by a dense layer holding its materialized weight, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear) and not name.endswith("base_layer"):
            replace_module(model, name, module.to_dense(dtype))
    _strip_quantization(model)
    return model


def merge_to_dense(model: Any, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A dense ``dtype`` model with the adapters merged exactly; for plain transformers.

    ``model`` is a PEFT model over lqmod layers (or a model with QuantizedLinear layers and
    no adapters). It is modified in place and the unwrapped transformers model returned:
    ``merge_to_dense(peft_model).save_pretrained(out)`` writes a checkpoint that
    ``AutoModelForCausalLM.from_pretrained(out)`` loads without lqmod.
    """
    for name, layer in _lora_layers(model):
        base = layer.get_base_layer()
        replace_module(model, name, base.to_dense(dtype, _merged_weight(layer)))
    model = _unwrap_peft(model)
    dequantize_model(model, dtype)
    model.to(dtype)
    return model


def merge_and_requantize(
    model: Any,
    quantizer: str | None = None,
    config: Mapping[str, Any] | None = None,
    *,
    stats: Mapping[str, LayerStats] | None = None,
    registry: Registry | None = None,
) -> tuple[Any, MergeReport]:
    """Merge each adapter into its base and quantize the merged weight again.

    ``quantizer``/``config`` default to each layer's own; naming another quantizer (with its
    config) moves the merged model to it. Quantizers that need statistics take ``stats``
    keyed by module name (as in the unwrapped model: ``model.layers.0.self_attn.q_proj``).
    Returns the unwrapped model (QuantizedLinear layers, savable with ``save_pretrained``
    through the ``"lqmod"`` transformers method) and the error each re-quantization added.
    """
    registry = registry or get_registry()
    report = MergeReport()
    prefix = "base_model.model."
    for name, layer in _lora_layers(model):
        base = layer.get_base_layer()
        assert isinstance(base, QuantizedLinear)
        plain = name.removeprefix(prefix)
        spec = registry.quantizer(quantizer) if quantizer is not None else base.spec
        cfg = dict(config) if config is not None else (base.qweight.config if quantizer is None else {})
        validate_config(spec.config_model, cfg, what=f"{spec.name} config for {plain}")
        merged = _merged_weight(layer)
        with torch.no_grad():
            old = base.dequantize(torch.float32)
            qweight = quantize_weight(spec, merged, cfg, stats.get(plain) if stats else None, name=plain)
            new = QuantizedLinear(
                qweight.to(base.device), spec, None if base.bias is None else base.bias.detach(),
                compute_dtype=base.compute_dtype,
            )
            new.origin = base.origin
            err = float((new.dequantize(torch.float32) - merged).norm() / merged.norm().clamp(min=1e-30))
            ratio = float((merged - old).norm() / old.norm().clamp(min=1e-30))
        report.layers.append(
            RequantizedLayer(plain, spec.name, qweight.config, err, ratio, qweight.bits_per_param())
        )
        replace_module(model, name, new)
    model = _unwrap_peft(model)
    if getattr(model, "config", None) is not None and hasattr(model, "save_pretrained"):
        from lqmod.integrations.transformers import attach_quantizer

        existing = getattr(model, "hf_quantizer", None)
        attach_quantizer(model, existing.quantization_config if existing is not None else None)
    return model, report
