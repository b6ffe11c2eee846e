"""A quantized model's adapted layers: finding them, their parameters, switching and converting them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from lqmod.config import validate_config
from lqmod.model.targets import replace_module
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import Registry, get_registry


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (and biases where ``train_bias`` was asked)."""
    return [p for _, m in iter_lora_layers(model) for p in m.parameters() if p.requires_grad]


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for _, m in iter_lora_layers(model):
        m.adapters_enabled = enabled


def convert_adapters(
    model: nn.Module,
    adapter: str,
    adapter_config: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
) -> list[str]:
    """Give every LoRA-adapted layer of ``model`` the ``adapter`` variant instead, built from
    its current ``A`` and ``B`` over the same frozen base (the quantized tensors are shared).

    For finetuning a checkpoint written with plain LoRA adapters as DoRA or IEC: at their
    default settings both start from exactly the function the LoRA layer computes. Only
    plain-LoRA layers convert (another variant's own parameters would be dropped); all or
    nothing, checked before any layer is touched. Returns the converted layers' names.
    """
    registry = registry or get_registry()
    spec = registry.adapter(adapter)
    layers = list(iter_lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers to convert: quantize it first")
    other = sorted({m.adapter_name for _, m in layers} - {"lora", adapter})
    if other:
        raise ValueError(
            f"only plain LoRA adapters convert to another variant; this model has {other} adapters, whose "
            "own parameters would be lost"
        )
    todo = [(n, m) for n, m in layers if m.adapter_name != adapter]
    configs = {n: m.lora_config.model_copy(update={"adapter": adapter, "adapter_config": dict(adapter_config or {})})
               for n, m in todo}
    cfg = validate_config(spec.config_model, dict(adapter_config or {}), what=f"{adapter} adapter config")
    if spec.check is not None:
        for name, m in todo:
            try:
                spec.check((m.out_features, m.in_features), configs[name], cfg)
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from None
    built = []
    for name, m in todo:
        new = LoRALinear.from_base(
            m.base_layer, configs[name], lora_a=m.lora_A.detach(), lora_b=m.lora_B.detach(), adapter=spec
        )
        new.adapters_enabled = m.adapters_enabled
        new.train(m.training)
        built.append((name, new))
    for name, new in built:
        replace_module(model, name, new)
    return [n for n, _ in built]
