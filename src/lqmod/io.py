"""Self-contained checkpoints (safetensors + JSON, no pickle) and PEFT adapter export.

A checkpoint directory holds:

* ``model.safetensors``: every tensor of the model: quantized tensors, adapters, and the
  parameters that were not quantized (embeddings, norms, heads);
* ``lqmod.json``: the format version, the model's class and config, the LoRA config, each
  quantized layer's header (quantizer, config, shape, meta), and the SHA-256 and size of
  the tensor file, so a truncated or corrupted file is refused with a clear message.

Directories are written to a temporary sibling and renamed into place, so an interrupted
save never leaves a half-written checkpoint under the target name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lqmod.config import LoRAConfig
from lqmod.model import iter_lora_layers, replace_module
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import Registry, get_registry
from lqmod.types import QuantizedWeight

__all__ = [
    "CheckpointError",
    "atomic_dir",
    "dequantized_copy",
    "export_peft",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
]

FORMAT = "lqmod-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "lqmod.json"
TENSORS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or of an unknown format."""


@contextmanager
def atomic_dir(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _model_info(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    info: dict[str, Any] = {"class": type(model).__name__, "module": type(model).__module__}
    if config is not None and hasattr(config, "to_dict"):
        info["library"] = "transformers"
        info["config"] = config.to_dict()
    return info


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
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": _model_info(model),
        "lora": json.loads(next(iter(lora_cfgs))),
        "layers": {
            name: {**m.base.header, "bias": m.bias is not None, "origin": m.origin}
            for name, m in layers.items()
        },
        "aliases": aliases,
        "extra": extra or {},
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt", "lqmod": FORMAT})
        manifest["files"] = {TENSORS: {"sha256": _sha256(tmp / TENSORS), "bytes": (tmp / TENSORS).stat().st_size}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return Path(path)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's JSON manifest, after checking that the tensor file is whole."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} not found (expected a directory with {MANIFEST} and {TENSORS})")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{path} has no {MANIFEST}: not an lqmod checkpoint")
    try:
        manifest: dict[str, Any] = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{mpath} is not valid JSON ({exc}); the checkpoint is corrupted") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if int(manifest.get("version", -1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath}: format version {manifest['version']} is newer than this lqmod reads "
            f"({FORMAT_VERSION}); upgrade lqmod"
        )
    tpath = path / TENSORS
    want = manifest["files"][TENSORS]
    if not tpath.exists():
        raise CheckpointError(f"{tpath} is missing")
    size = tpath.stat().st_size
    if size != want["bytes"]:
        raise CheckpointError(
            f"{tpath} is truncated or was modified: {size} bytes, the manifest says {want['bytes']}"
        )
    if _sha256(tpath) != want["sha256"]:
        raise CheckpointError(f"{tpath} is corrupted: its SHA-256 does not match the manifest")
    return manifest


def _build_skeleton(info: dict[str, Any]) -> nn.Module:
    if info.get("library") != "transformers":
        raise CheckpointError(
            f"checkpoint holds a {info.get('class')} that is not a transformers model; "
            "pass model=<an instance of that architecture> to load_checkpoint"
        )
    import transformers

    cls = getattr(transformers, info["class"], None)
    if cls is None:
        raise CheckpointError(f"transformers has no class {info['class']!r} (installed {transformers.__version__})")
    cfg_dict = dict(info["config"])
    config = transformers.AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    model: nn.Module = cls(config)
    return model


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a quantized model with its adapters. No original weights are needed.

    For transformers models the architecture is rebuilt from the stored config; for other
    models pass a freshly constructed ``model`` of the same architecture.
    """
    path = Path(path)
    manifest = read_manifest(path)
    registry = registry or get_registry()
    lora = LoRAConfig.model_validate(manifest["lora"])
    if model is None:
        model = _build_skeleton(manifest["model"])
    try:
        with safe_open(str(path / TENSORS), framework="pt", device=str(device)) as fh:
            stored = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / TENSORS} cannot be read: {exc}") from None
    for alias, kept in manifest.get("aliases", {}).items():
        stored[alias] = stored[kept]
    for name, header in manifest["layers"].items():
        spec = registry.quantizer(header["quantizer"])
        prefix = f"{name}."
        qtensors = {k: stored[f"{prefix}base.{k}"] for k in header["tensors"]}
        qweight = QuantizedWeight.from_header(header, qtensors)
        layer = LoRALinear(
            qweight,
            spec,
            lora,
            lora_a=stored[f"{prefix}lora_A"],
            lora_b=stored[f"{prefix}lora_B"],
            bias=stored.get(f"{prefix}bias") if header.get("bias") else None,
        )
        layer.origin = header.get("origin", "linear")
        replace_module(model, name, layer)
    missing, unexpected = model.load_state_dict(stored, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in iter_lora_layers(model):
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
        if m.bias is not None:
            m.bias.requires_grad_(lora.train_bias)
    model.eval()
    return model.to(device)


def export_peft(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters in PEFT's LoRA format (``adapter_model.safetensors`` + config).

    The adapters were trained against the *quantized* base: apply them to
    :func:`dequantized_copy` of the model (or an equally quantized base) to get the same outputs.
    """
    layers = dict(iter_lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers to export")
    lora = next(iter(layers.values())).lora_config
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
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
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
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
