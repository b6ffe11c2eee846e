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
from torch import nn

from lqmod.integrations.formats import BaseLayer, ServingBase
from lqmod.io import atomic_dir, write_safetensors
from lqmod.quantize import QuantizationError
from lqmod.types import QuantizedWeight
from lqmod_optq.config import NAME
from lqmod_optq.gptq_format import CHECKPOINT_FORMATS, from_gptq, to_gptq

__all__ = ["GPTQCheckpointError", "read_gptq_checkpoint", "write_gptq_checkpoint", "write_gptq_files"]

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

    ``model`` is an lqmod model (``LoRALinear`` layers), a model with
    :class:`~lqmod.nn.QuantizedLinear` layers (loaded with ``LqmodConfig``), or a PEFT model
    over either; the base is written under the plain module names. The GPTQ format has no
    place for LoRA adapters: only the quantized bases are written (for base + adapter, see
    :func:`lqmod.integrations.serving.export_for_serving`). Layers of other quantizers cannot
    be written in GPTQ form and are an error. The most common (bits, group_size, sym,
    desc_act) becomes the base config; other layers get GPTQModel ``dynamic`` overrides by
    exact name, and linear layers left dense get a ``-:`` (skip) rule so that GPTQModel does
    not look for their packed tensors. Atomic: the directory appears complete or not at all.
    """
    from lqmod.integrations.serving import collect_base

    base = collect_base(model)
    _check_quantizers(base.layers)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_gptq_files(base, tmp, checkpoint_format=checkpoint_format)
    return Path(path)


def _check_quantizers(layers: Mapping[str, BaseLayer]) -> None:
    other = sorted(n for n, layer in layers.items() if layer.qweight.quantizer != NAME)
    if other:
        kinds = sorted({layers[n].qweight.quantizer for n in other})
        raise GPTQCheckpointError(
            f"{len(other)} layer(s) use other quantizers ({', '.join(kinds)}), which have no GPTQ form, "
            f"e.g. {other[:3]}; "
            f"only {NAME!r} layers can be written as GPTQ: quantize them with {NAME!r}, or export dense "
            "(lqmod.integrations.merge.merge_to_dense) or as an lqmod checkpoint (lqmod.io.save_checkpoint)"
        )
    if not layers:
        raise GPTQCheckpointError(f"the model has no {NAME} layers (quantize it with quantizer={NAME!r} first)")


def write_gptq_files(base: ServingBase, folder: Path, *, checkpoint_format: str = "gptq") -> None:
    """Write the GPTQ checkpoint files of ``base`` into the existing directory ``folder``
    (``model.safetensors``, ``quantize_config.json`` and, for transformers models, ``config.json``)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise GPTQCheckpointError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, not {checkpoint_format!r}")
    _check_quantizers(base.layers)
    tensors: dict[str, torch.Tensor] = {}
    grids: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for name, layer in base.layers.items():
        qw = layer.qweight
        for key, t in to_gptq(qw, checkpoint_format=checkpoint_format).items():
            tensors[f"{name}.{key}"] = t
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous()
        cfg = dict(qw.config)
        grids[name] = {k: cfg[k] for k in _GRID_KEYS}
        configs[name] = cfg
    for key, t in base.tensors.items():
        tensors[key] = t.detach().cpu().contiguous()

    counts: dict[str, int] = {}
    for g in grids.values():
        counts[json.dumps(g, sort_keys=True)] = counts.get(json.dumps(g, sort_keys=True), 0) + 1
    top = json.loads(max(counts, key=lambda k: counts[k]))
    dynamic: dict[str, dict[str, Any]] = {
        f"+:^{re.escape(n)}$": {k: g[k] for k in _GRID_KEYS if g[k] != top[k]} for n, g in grids.items() if g != top
    }
    # GPTQModel quantizes every linear layer its model definition lists unless a "-:" rule
    # skips it, and refuses a checkpoint lacking that layer's qweight ("lm_head": False
    # already covers the head).
    dynamic.update({f"-:^{re.escape(n)}$": {} for n in base.dense_linears if n.rpartition(".")[2] != "lm_head"})
    quant_config: dict[str, Any] = {
        **top,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": ["lqmod:optq"], LQMOD_META_KEY: configs},
    }
    if dynamic:
        quant_config["dynamic"] = dynamic
    write_safetensors(tensors, folder / TENSORS, metadata={"format": "pt"})
    (folder / QUANT_CONFIG).write_text(json.dumps(quant_config, indent=2, sort_keys=True))
    if base.config is not None and hasattr(base.config, "to_dict"):
        data = base.config.to_dict()
        data["quantization_config"] = {k: v for k, v in quant_config.items() if k != "meta"}
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


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
