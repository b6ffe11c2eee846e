"""Adapters exported in PEFT's LoRA format, and the dequantized base they apply to."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lqmod.io.atomic import atomic_dir
from lqmod.io.tensor_files import write_safetensors
from lqmod.model import iter_lora_layers, replace_module
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import get_registry


def export_peft(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters in PEFT's LoRA format (``adapter_model.safetensors`` + config).

    Only variants whose spec has a :class:`~lqmod.types.PeftForm` can be exported (LoRA;
    DoRA as ``use_dora=True`` with its ``lora_magnitude_vector``); any other (IEC) is a
    ``ValueError`` naming the variants PEFT loads.

    The adapters were trained against the *quantized* base: apply them to
    :func:`dequantized_copy` of the model (or an equally quantized base) to get the same outputs.
    """
    layers = dict(iter_lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers to export")
    lora = next(iter(layers.values())).lora_config
    variants = {m.adapter_name: m.adapter_spec for m in layers.values()}
    no_peft = sorted(v for v, spec in variants.items() if spec.peft is None)
    if no_peft:
        loadable = sorted(n for n, s in get_registry().adapters().items() if s.peft is not None)
        raise ValueError(
            f"PEFT cannot load the {', '.join(repr(v) for v in no_peft)} adapter variant; PEFT loads "
            f"{', '.join(loadable)}. Save an lqmod checkpoint (lqmod.io.save_checkpoint) instead"
        )
    if len(variants) > 1:
        raise ValueError(f"layers use several adapter variants {sorted(variants)}; a PEFT adapter holds one")
    form = next(iter(variants.values())).peft
    assert form is not None
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        for key, t in form.tensors(m.adapter).items():
            tensors[f"base_model.model.{name}.{key}"] = t.detach().contiguous().cpu()
    fan_in_fan_out = any(m.origin == "conv1d" for m in layers.values())
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": None,
        **dict(form.config),
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return Path(path)


def dequantized_copy(model: nn.Module, materialize_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``model`` whose adapted layers are plain dense layers holding the
    materialized quantized weight (adapters dropped): the base a PEFT export applies to."""
    import copy

    clone = copy.deepcopy(model)
    makers: dict[str, Callable[[LoRALinear], nn.Module]] = {"linear": _to_linear, "conv1d": _to_conv1d}
    for name, m in list(iter_lora_layers(clone)):
        replace_module(clone, name, makers[m.origin](m))
    return clone


def _to_linear(m: LoRALinear) -> nn.Module:
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(m.dense_weight(torch.float32))
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin


def _to_conv1d(m: LoRALinear) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(m.out_features, m.in_features)
    with torch.no_grad():
        conv.weight.copy_(m.dense_weight(torch.float32).t())
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    return conv
