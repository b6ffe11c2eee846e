"""Reading a model directory's safetensors tensors on demand into a skeleton built on the meta device."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


class SafetensorsSource:
    """The tensors of a model directory's safetensors files, read on demand.

    Reads go through ``safe_open`` and each file is opened only for the duration of one
    read, so no mapping of a (possibly huge) file outlives the tensors taken from it.
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.root = Path(model_dir)
        files = sorted(self.root.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{self.root} has no *.safetensors files: streamed quantization reads safetensors weights only "
                "(convert a GGUF or pickle checkpoint once with transformers' save_pretrained)"
            )
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                    if key in self.where:
                        raise ValueError(f"tensor {key!r} is in both {self.where[key].name} and {f.name}")
                    self.where[key] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``names`` as float32 (floating tensors; others as stored), grouped by file."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.where]
        if missing:
            raise KeyError(f"{self.root} holds no tensor {missing[0]!r} (and {len(missing) - 1} more missing)")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        for f, group in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for n in group:
                    t = fh.get_tensor(n)
                    # A cast makes a fresh tensor; a float32 one is cloned off the file mapping.
                    out[n] = t.to(torch.float32) if t.is_floating_point() and t.dtype != torch.float32 else t.clone()
        return out


def build_skeleton(model_dir: str | os.PathLike[str]) -> nn.Module:
    """The transformers model of ``model_dir`` on the meta device, as :func:`lqmod.hf.load_local_model`
    would build it in float32 (same class, config and tied weights), holding no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    archs = getattr(config, "architectures", None) or []
    cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
    # Buffers stay real: rotary tables are computed, not loaded, and are needed to run blocks.
    with init_empty_weights(include_buffers=False):
        model: nn.Module = cls.from_config(config, dtype=torch.float32)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # from_pretrained ties the embeddings to the head; from_config leaves that to loading
    return model.eval()


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _load_layer(model: nn.Module, source: SafetensorsSource, name: str) -> None:
    module = model.get_submodule(name)
    keys = [f"{name}.{k}" for k, _ in module.named_parameters(recurse=False)]
    for key, t in source.read(keys).items():
        _assign(model, key, t)


def _is_param(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr in (model.get_submodule(owner) if owner else model)._parameters
