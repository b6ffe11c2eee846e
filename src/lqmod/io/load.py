"""Loading a checkpoint: the model rebuilt, every layer checked by its quantizer and adapter."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lqmod.config import LoRAConfig
from lqmod.io.format import MANIFEST, TENSORS, CheckpointError
from lqmod.io.validation import read_manifest
from lqmod.model import iter_lora_layers, replace_module
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import Registry, get_registry
from lqmod.quantize import QuantizationError, check_materialized, validate_qweight
from lqmod.types import QuantizedWeight


def _build_skeleton(info: dict[str, Any]) -> nn.Module:
    if info.get("library") != "transformers":
        raise CheckpointError(
            f"checkpoint holds a {info.get('class')} that is not a transformers model; "
            "pass model=<an instance of that architecture> to load_checkpoint"
        )
    import transformers

    name = info.get("class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        raise CheckpointError(f"transformers has no class {name!r} (installed {transformers.__version__})")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"the manifest's model class {name!r} is not a transformers model class "
            "(e.g. LlamaForCausalLM, BertModel); the manifest is damaged or was edited"
        )
    cfg_dict = info.get("config")
    if not isinstance(cfg_dict, dict) or not isinstance(cfg_dict.get("model_type"), str):
        raise CheckpointError("the manifest's model config is not a transformers config with a 'model_type'")
    cfg_dict = dict(cfg_dict)
    try:
        config = transformers.AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
        model: nn.Module = cls(config)
    except Exception as exc:  # transformers raises many kinds for a config that does not fit
        raise CheckpointError(
            f"cannot build a {name} from the manifest's model config: {type(exc).__name__}: {exc}"
        ) from None
    return model


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> nn.Module:
    """Rebuild a quantized model with its adapters. No original weights are needed.

    For transformers models the architecture is rebuilt from the stored config; for other
    models pass a freshly constructed ``model`` of the same architecture. Every layer is
    checked by its quantizer (see :func:`lqmod.quantize.validate_qweight`) and, with
    ``verify`` (the default), materialized once to check that it is finite.
    """
    path = Path(path)
    manifest = read_manifest(path)
    registry = registry or get_registry()
    try:
        lora = LoRAConfig.model_validate(manifest["lora"])
    except ValueError as exc:
        raise CheckpointError(f"{path / MANIFEST}: invalid LoRA config: {' '.join(str(exc).split())}") from None
    if model is None:
        model = _build_skeleton(manifest["model"])
    try:
        with safe_open(str(path / TENSORS), framework="pt", device=str(device)) as fh:
            stored = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / TENSORS} cannot be read: {exc}") from None
    for alias, kept in manifest.get("aliases", {}).items():
        if kept not in stored:
            raise CheckpointError(f"alias {alias!r} names {kept!r}, which {TENSORS} does not hold")
        stored[alias] = stored[kept]
    if manifest["version"] < 3:
        stored = _flat_layer_keys_to_v3(stored, manifest["layers"])
    new_layers: dict[str, LoRALinear] = {}
    for name, header in manifest["layers"].items():
        what = f"{path}: layer {name!r}"
        spec = registry.quantizer(str(header.get("quantizer")))
        prefix = f"{name}."
        names = header.get("tensors")
        if not isinstance(names, list) or not all(isinstance(k, str) for k in names):
            raise CheckpointError(f"{what}: 'tensors' must list tensor names, got {names!r}")
        absent = [f"{prefix}adapter.{k}" for k in ("lora_A", "lora_B")]
        absent += [f"{prefix}base_layer.base.{k}" for k in names]
        absent = [k for k in absent if k not in stored]
        if header.get("bias") and f"{prefix}base_layer.bias" not in stored:
            absent.append(f"{prefix}base_layer.bias")
        if absent:
            raise CheckpointError(f"{what}: {TENSORS} lacks {absent[:5]}")
        layer_lora = _layer_lora_config(lora, header, what)
        adapter_spec = registry.adapter(layer_lora.adapter)
        try:
            qweight = QuantizedWeight.from_header(header, {k: stored[f"{prefix}base_layer.base.{k}"] for k in names})
            # The quantizer itself checks that the tensors are what its config describes.
            qweight = validate_qweight(spec, qweight, name=what)
            if verify:
                with torch.no_grad():
                    check_materialized(spec, qweight, spec.materialize(qweight, torch.float32), name=what)
            layer = LoRALinear(
                qweight,
                spec,
                layer_lora,
                lora_a=stored[f"{prefix}adapter.lora_A"],
                lora_b=stored[f"{prefix}adapter.lora_B"],
                bias=stored.get(f"{prefix}base_layer.bias") if header.get("bias") else None,
                adapter=adapter_spec,
            )
        except QuantizationError as exc:
            raise CheckpointError(str(exc)) from None
        except ValueError as exc:
            raise CheckpointError(f"{what}: {exc}") from None
        origin = header.get("origin", "linear")
        if origin not in ("linear", "conv1d"):
            raise CheckpointError(f"{what}: origin {origin!r} is not 'linear' or 'conv1d'")
        layer.origin = origin
        new_layers[name] = layer
    known = {n for n, _ in model.named_modules()}
    unknown = sorted(set(new_layers) - known)
    if unknown:
        raise CheckpointError(f"checkpoint layers {unknown[:5]} are not modules of the {type(model).__name__} model")
    for name, layer in new_layers.items():
        replace_module(model, name, layer)
    try:
        missing, unexpected = model.load_state_dict(stored, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CheckpointError(f"checkpoint does not fit the model: {' '.join(str(exc).split())[:500]}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, layer in new_layers.items():
        if layer.adapter_spec.validate is not None:
            try:
                layer.adapter_spec.validate(layer.adapter)
            except ValueError as exc:
                raise CheckpointError(f"{path}: layer {name!r}: {exc}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in iter_lora_layers(model):
        for p in m.adapter.parameters():
            p.requires_grad_(True)
        if m.bias is not None:
            m.bias.requires_grad_(m.lora_config.train_bias)
    model.eval()
    return model.to(device)


def _flat_layer_keys_to_v3(stored: dict[str, torch.Tensor], layers: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a version 1/2 checkpoint's layer tensors to the base_layer/adapter layout."""
    prefixes = [f"{name}." for name in layers]
    renamed: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        for prefix in prefixes:
            rest = key[len(prefix):] if key.startswith(prefix) else None
            if rest in ("lora_A", "lora_B"):
                key = f"{prefix}adapter.{rest}"
            elif rest == "bias" or (rest is not None and rest.startswith("base.")):
                key = f"{prefix}base_layer.{rest}"
            else:
                continue
            break
        renamed[key] = t
    return renamed


def _layer_lora_config(lora: LoRAConfig, header: Mapping[str, Any], what: str) -> LoRAConfig:
    """The checkpoint's LoRA config with this layer's recorded adapter variant (absent: "lora",
    what every checkpoint written before variants were recorded holds)."""
    name = header.get("adapter", "lora")
    config = header.get("adapter_config", {})
    if not isinstance(name, str) or not isinstance(config, dict):
        raise CheckpointError(
            f"{what}: 'adapter' must be a variant name and 'adapter_config' a JSON object, got {name!r}, {config!r}"
        )
    if name == lora.adapter and config == lora.adapter_config:
        return lora
    return lora.model_copy(update={"adapter": name, "adapter_config": config})
