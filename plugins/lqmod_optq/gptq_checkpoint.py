"""GPTQ checkpoint directories (AutoGPTQ / GPTQModel layout) <-> lqmod optq layers.

A directory holds ``model.safetensors`` (or shards with ``model.safetensors.index.json``) with
``<module>.qweight``, ``.qzeros``, ``.scales``, ``.g_idx`` (and ``.bias``) per quantized
linear layer plus the model's other tensors, and ``quantize_config.json`` with ``bits``,
``group_size``, ``desc_act``, ``sym``, ``checkpoint_format`` and optionally GPTQModel's
``dynamic`` per-module overrides. Only safetensors are read (never pickle files).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lqmod.io import atomic_dir
from lqmod.nn.lora_linear import LoRALinear
from lqmod.quantize import QuantizationError
from lqmod.types import QuantizedWeight
from lqmod_optq.config import NAME
from lqmod_optq.gptq_format import CHECKPOINT_FORMATS, from_gptq, to_gptq

__all__ = ["GPTQCheckpointError", "read_gptq_checkpoint", "write_gptq_checkpoint"]

QUANT_CONFIG = "quantize_config.json"
TENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
LQMOD_META_KEY = "lqmod_optq_configs"
_GRID_KEYS = ("bits", "group_size", "sym", "desc_act")


class GPTQCheckpointError(ValueError):
    """A GPTQ checkpoint directory is missing, malformed, or holds what lqmod cannot read."""


def write_gptq_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    checkpoint_format: str = "gptq",
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s optq layers (and its other tensors, dense) as a GPTQ checkpoint directory.

    The GPTQ format has no place for LoRA adapters: only the quantized bases are written (export
    adapters with :func:`lqmod.io.export_peft`). Layers of other quantizers cannot be written in
    GPTQ form and are an error. The most common (bits, group_size, sym, desc_act) becomes the
    base config; other layers get GPTQModel ``dynamic`` overrides by exact name. Atomic: the
    directory appears complete or not at all.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise GPTQCheckpointError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, not {checkpoint_format!r}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    other = sorted(n for n, m in layers.items() if m.quantizer != NAME)
    if other:
        raise GPTQCheckpointError(
            f"{len(other)} layer(s) use other quantizers and have no GPTQ form, e.g. {other[:3]}; "
            "quantize them with 'optq' or save an lqmod checkpoint (lqmod.io.save_checkpoint) instead"
        )
    if not layers:
        raise GPTQCheckpointError("the model has no optq layers (quantize it with quantizer='optq' first)")

    tensors: dict[str, torch.Tensor] = {}
    grids: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        qw = layer.qweight
        for key, t in to_gptq(qw, checkpoint_format=checkpoint_format).items():
            tensors[f"{name}.{key}"] = t
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous()
        cfg = dict(qw.config)
        grids[name] = {k: cfg[k] for k in _GRID_KEYS}
        configs[name] = cfg
    prefixes = tuple(f"{n}." for n in layers)
    seen: set[tuple[int, int]] = set()
    for key, t in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and ident in seen:
            continue  # tied weights: safetensors refuses shared storage; loaders re-tie them
        seen.add(ident)
        tensors[key] = t.detach().cpu().contiguous()

    counts: dict[str, int] = {}
    for g in grids.values():
        counts[json.dumps(g, sort_keys=True)] = counts.get(json.dumps(g, sort_keys=True), 0) + 1
    base = json.loads(max(counts, key=lambda k: counts[k]))
    dynamic = {
        f"+:^{re.escape(n)}$": {k: g[k] for k in _GRID_KEYS if g[k] != base[k]} for n, g in grids.items() if g != base
    }
    quant_config: dict[str, Any] = {
        **base,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": ["lqmod:optq"], LQMOD_META_KEY: configs},
    }
    if dynamic:
        quant_config["dynamic"] = dynamic
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt"})
        (tmp / QUANT_CONFIG).write_text(json.dumps(quant_config, indent=2, sort_keys=True))
        model_config = getattr(model, "config", None)
        if model_config is not None and hasattr(model_config, "to_dict"):
            data = model_config.to_dict()
            data["quantization_config"] = {k: v for k, v in quant_config.items() if k != "meta"}
            (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return Path(path)


def _load_quant_config(folder: Path) -> dict[str, Any]:
    for candidate in (QUANT_CONFIG, "quant_config.json"):
        if (folder / candidate).is_file():
            try:
                data = json.loads((folder / candidate).read_text())
            except json.JSONDecodeError as exc:
                raise GPTQCheckpointError(f"{folder / candidate} is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise GPTQCheckpointError(f"{folder / candidate} must hold a JSON object")
            return data
    if (folder / "config.json").is_file():
        data = json.loads((folder / "config.json").read_text()).get("quantization_config")
        if isinstance(data, dict):
            return data
    raise GPTQCheckpointError(f"{folder} has no quantize_config.json (nor config.json with a quantization_config)")


def _tensor_files(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise GPTQCheckpointError(f"{folder / INDEX} is malformed ({exc}): expected a 'weight_map'") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f"; found {pickles}, which are pickle files lqmod does not load" if pickles else ""
        raise GPTQCheckpointError(f"{folder} holds no .safetensors file{hint}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise GPTQCheckpointError(f"checkpoint shards are missing: {missing}")
    return files


def _grid_for(name: str, base: Mapping[str, Any]) -> dict[str, Any] | None:
    """The module's (bits, group_size, sym, desc_act) after GPTQModel ``dynamic`` rules; None = skipped."""
    grid = {k: base.get(k) for k in _GRID_KEYS}
    for pattern, override in (base.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        regex = pattern[2:] if pattern.startswith(("+:", "-:")) else pattern
        if re.match(regex, name):
            if negative:
                return None
            grid.update({k: v for k, v in dict(override).items() if k in _GRID_KEYS})
            break
    return grid


def read_gptq_checkpoint(path: str | os.PathLike[str]) -> dict[str, QuantizedWeight]:
    """Every quantized linear layer of a GPTQ checkpoint directory, as optq QuantizedWeights by module name.

    The result plugs into :class:`lqmod.LoRALinear` (with the 'optq' spec) or replaces a
    quantize step; the checkpoint's other tensors (embeddings, norms, biases) are not returned.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise GPTQCheckpointError(f"{folder} is not a directory")
    qc = _load_quant_config(folder)
    method = str(qc.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise GPTQCheckpointError(f"quant_method is {method!r}; only 'gptq' checkpoints can be read")
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq")))
    if fmt not in CHECKPOINT_FORMATS:
        raise GPTQCheckpointError(f"checkpoint_format {fmt!r} is not supported; supported: {CHECKPOINT_FORMATS}")
    if str(qc.get("pack_dtype", "int32")) not in ("int32", "torch.int32"):
        raise GPTQCheckpointError(f"pack_dtype {qc['pack_dtype']!r} is not supported; GPTQ int32 words only")
    for key in ("bits", "group_size"):
        if key not in qc:
            raise GPTQCheckpointError(f"quantize_config lacks {key!r}")
    qc.setdefault("sym", True)
    qc.setdefault("desc_act", False)
    lqmod_configs = (qc.get("meta") or {}).get(LQMOD_META_KEY, {}) if isinstance(qc.get("meta"), dict) else {}

    found: dict[str, dict[str, torch.Tensor]] = {}
    for file in _tensor_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    module, _, suffix = key.rpartition(".")
                    if suffix in SUFFIXES:
                        found.setdefault(module, {})[suffix] = f.get_tensor(key)
        except (OSError, SafetensorError) as exc:
            raise GPTQCheckpointError(f"cannot read {file}: {exc}") from None
    if not found:
        raise GPTQCheckpointError(f"{folder} holds no GPTQ layers (no '<module>.qweight' tensors)")

    out: dict[str, QuantizedWeight] = {}
    for module in sorted(found):
        grid = _grid_for(module, qc)
        if grid is None:
            continue
        try:
            out[module] = from_gptq(
                found[module],
                bits=int(grid["bits"]),
                group_size=int(grid["group_size"]),
                sym=bool(grid["sym"]),
                checkpoint_format=fmt,
                config=lqmod_configs.get(module) or {"desc_act": bool(grid["desc_act"])},
                name=module,
            )
        except QuantizationError as exc:
            raise GPTQCheckpointError(f"{folder}: {exc}") from None
    return out
