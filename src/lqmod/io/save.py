"""Saving a quantized model with its adapters as a checkpoint directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lqmod.io.atomic import atomic_dir
from lqmod.io.format import TENSOR_METADATA, TENSORS
from lqmod.io.manifest import checkpoint_manifest, finish_checkpoint, layer_header
from lqmod.io.tensor_files import write_safetensors
from lqmod.model import iter_lora_layers


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without repeated storage (tied weights): tensors, and alias -> kept name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (quantized, with adapters) as a self-contained checkpoint directory."""
    layers = dict(iter_lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers: quantize it first (lqmod.model.quantize_model)")
    lora_cfgs = {m.lora_config.model_dump_json() for m in layers.values()}
    if len(lora_cfgs) != 1:
        raise ValueError("all adapted layers must share one LoRA config to be saved together")
    tensors, aliases = _unique_state(model)
    manifest = checkpoint_manifest(
        model,
        next(iter(lora_cfgs)),
        {name: layer_header(m) for name, m in layers.items()},
        aliases,
        extra,
    )
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_safetensors(tensors, tmp / TENSORS, metadata=TENSOR_METADATA)
        finish_checkpoint(tmp, manifest)
    return Path(path)
