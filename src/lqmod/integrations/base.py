"""Quantize a model's linear layers into adapter-free :class:`~lqmod.nn.QuantizedLinear` bases.

The counterpart of :func:`lqmod.model.quantize_model` for models whose adapters come from
another library (PEFT): the same targets, plans, registry and checks, but no LoRA is attached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lqmod.config import Plan, PlanEntry, TargetConfig, validate_config
from lqmod.model import (
    LayerReport,
    QuantizeReport,
    iter_lora_layers,
    missing_stats_message,
    replace_module,
)
from lqmod.model.targets import _resolve_entries
from lqmod.nn.lora_linear import LoRALinear
from lqmod.nn.quantized_linear import QuantizedLinear
from lqmod.plugins import Registry, get_registry
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.types import LayerStats, QuantizerSpec

__all__ = ["dense_weight", "quantize_linears", "resolve_entries", "to_quantized_linears"]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or a transformers ``Conv1D`` (stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return weight.detach().t()
    raise TypeError(f"cannot quantize {type(module).__name__}: supported are torch.nn.Linear and transformers' Conv1D")


def resolve_entries(
    model: nn.Module,
    quantizer: str | None,
    config: Any,
    *,
    targets: TargetConfig | Mapping[str, Any] | None = None,
    plan: Plan | Mapping[str, Any] | None = None,
) -> dict[str, PlanEntry]:
    """Module name -> quantizer and config: every layer ``targets`` selects, or the ``plan``'s."""
    # The same resolution quantize_model uses, so both routes accept and refuse the same input.
    target_cfg: TargetConfig = validate_config(TargetConfig, targets, what="targets")
    return _resolve_entries(model, quantizer, config, target_cfg, plan)


def quantize_one(
    module: nn.Module, spec: QuantizerSpec, config: Any, stats: LayerStats | None, *, name: str
) -> tuple[QuantizedLinear, LayerReport]:
    """``module`` (Linear/Conv1D) quantized to a QuantizedLinear on its device, and its report."""
    weight = dense_weight(module)
    qweight = quantize_weight(spec, weight, config, stats, name=name)
    bias = getattr(module, "bias", None)
    layer = QuantizedLinear(
        qweight.to(weight.device), spec, None if bias is None else bias.detach(), compute_dtype=weight.dtype
    )
    layer.origin = "linear" if isinstance(module, nn.Linear) else "conv1d"
    with torch.no_grad():
        deq = spec.materialize(qweight, torch.float32)
        err = float((deq - weight.float()).norm() / weight.float().norm().clamp(min=1e-30))
    report = LayerReport(name, qweight.shape, spec.name, qweight.config, qweight.bits_per_param(), err)
    return layer, report


def quantize_linears(
    model: nn.Module,
    quantizer: str | None = "nf",
    config: Any = None,
    *,
    targets: TargetConfig | Mapping[str, Any] | None = None,
    plan: Plan | Mapping[str, Any] | None = None,
    stats: Mapping[str, LayerStats] | None = None,
    registry: Registry | None = None,
    progress: bool = False,
) -> QuantizeReport:
    """Replace the chosen linear layers of ``model`` by frozen QuantizedLinear layers, in place.

    Every name and config is validated before the model is touched. Layers are quantized
    one at a time, so peak memory stays one dense layer above the model. The model's other
    parameters are left as they are (PEFT freezes what it does not train).
    """
    registry = registry or get_registry()
    entries = resolve_entries(model, quantizer, config, targets=targets, plan=plan)
    specs = {name: registry.quantizer(e.quantizer) for name, e in entries.items()}
    for name, e in entries.items():
        validate_config(specs[name].config_model, e.config, what=f"{e.quantizer} config for {name}")
        missing = [s for s in sorted(specs[name].needs) if stats is None or getattr(stats.get(name), s, None) is None]
        if missing:
            raise QuantizationError(missing_stats_message(name, specs[name].name, missing))
    report = QuantizeReport()
    for name in tqdm(list(entries), desc="quantizing", unit="layer", disable=not progress):
        layer, row = quantize_one(
            model.get_submodule(name), specs[name], entries[name].config, stats.get(name) if stats else None, name=name
        )
        replace_module(model, name, layer)
        report.layers.append(row)
    return report


def to_quantized_linears(model: nn.Module) -> list[str]:
    """Swap every :class:`LoRALinear` for a QuantizedLinear holding the same quantized base.

    For bases built by lqmod's own pipeline (e.g. sequential OPTQ calibration), which
    attaches adapters: these must still be at their initial value ``B = 0`` (so the base
    alone computes what the layer computed), or the conversion would silently drop a trained
    update; a trained LoRALinear raises, use :func:`lqmod.integrations.merge` instead.
    """
    names: list[str] = []
    layers = list(iter_lora_layers(model))
    for name, layer in layers:
        if bool(layer.lora_B.detach().abs().max() > 0) or layer.lora_config.initializer != "default":
            raise ValueError(
                f"{name}: its LoRA adapter is not at its initial value (B = 0, default initializer); "
                "converting would drop it. Merge the adapter first"
            )
        with torch.no_grad():  # a variant's own parameters (e.g. a trained DoRA magnitude) count too
            w = layer.dense_weight()
            moved = float((layer.merged_weight() - w).norm() / w.norm().clamp_min(1e-30))
        if moved > 1e-6:
            raise ValueError(
                f"{name}: its {layer.adapter_name} adapter changes the layer (relative {moved:.2g}) although B = 0; "
                "converting would drop it. Merge the adapter first"
            )
    for name, layer in layers:
        replace_module(model, name, _from_lora(layer))
        names.append(name)
    return names


def _from_lora(layer: LoRALinear) -> QuantizedLinear:
    # The adapted layer's own frozen base, detached from its adapter (nothing is copied).
    out = layer.base_layer
    if out.bias is not None:
        out.bias.requires_grad_(False)
    return out
