"""The serving route: a quantized base in an engine's format plus the adapter in PEFT's format.

Engines that serve a quantized base with LoRA adapters on top (vLLM, TGI, GPTQModel, ...)
take the two as separate directories. :func:`export_for_serving` writes both from one
finetuned model, of either kind lqmod makes:

* an lqmod model (``lqmod.model.quantize_model``, ``lqmod finetune``, ``load_checkpoint``):
  ``LoRALinear`` layers holding the quantized base and the adapter;
* a transformers model loaded with ``LqmodConfig`` (``QuantizedLinear`` layers) wrapped by
  ``peft.get_peft_model`` / ``PeftModel.from_pretrained``.

The output directory holds ``base/`` (the format's files, a transformers ``config.json`` and
the tokenizer when one is given), ``adapter/`` (``adapter_model.safetensors`` +
``adapter_config.json``, module names as PEFT writes them for the plain base) and
``lqmod-export.json`` (what was written). It appears complete or not at all.

Formats are registered by the plug-ins whose layers they hold (:mod:`lqmod.integrations.formats`);
:func:`export_gptq_peft` is the GPTQ one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lqmod.integrations import formats
from lqmod.integrations.formats import BaseFormat, BaseLayer, ServingBase
from lqmod.io import atomic_dir, export_peft, write_safetensors
from lqmod.nn.lora_linear import LoRALinear
from lqmod.nn.quantized_linear import QuantizedLinear

__all__ = ["ServingExport", "collect_base", "export_for_serving", "export_gptq_peft"]

MANIFEST = "lqmod-export.json"
# Module-name components that belong to PEFT's adapters (or its trained copies), not the base.
_ADAPTER_PARTS = frozenset(
    {
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "lora_dropout",
        "modules_to_save",
    }
)
# Wrapper components PEFT inserts above a base module; the plain name drops them.
_WRAPPER_PARTS = frozenset({"base_layer", "original_module"})


@dataclass(frozen=True)
class ServingExport:
    """Where the export went and what it holds."""

    path: Path
    base: Path
    adapter: Path
    base_format: str
    quantizers: tuple[str, ...]
    n_layers: int


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _plain(name: str) -> str | None:
    """``name`` with PEFT's wrapper components removed; None for an adapter's own module."""
    parts = name.split(".") if name else []
    if any(p in _ADAPTER_PARTS for p in parts):
        return None
    return ".".join(p for p in parts if p not in _WRAPPER_PARTS)


def _is_dense_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def collect_base(model: nn.Module) -> ServingBase:
    """The frozen base of ``model`` (lqmod model, QuantizedLinear model, or a PEFT model over
    either), under plain module names, without adapters. Nothing is copied or modified."""
    inner: nn.Module = model.get_base_model() if _is_peft(model) else model  # type: ignore[operator]
    layers: dict[str, BaseLayer] = {}
    dense: list[str] = []
    for name, module in inner.named_modules():
        plain = _plain(name)
        if plain is None:
            continue
        if isinstance(module, (QuantizedLinear, LoRALinear)):
            # After lqmod's own LoRALinear holds a QuantizedLinear child (``.base_layer``),
            # both name the same plain layer and carry the same weight.
            bias = module.bias
            layers[plain] = BaseLayer(module.qweight, None if bias is None else bias.detach(), module.origin)
        elif _is_dense_linear(module):
            dense.append(plain)
    prefixes = tuple(f"{n}." for n in layers)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    for key, t in inner.state_dict().items():
        plain = _plain(key)
        if plain is None or plain.startswith(prefixes):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue  # tied weights: safetensors refuses shared storage; loaders re-tie them
        seen.add(ident)
        tensors[plain] = t.detach()
    dense_linears = tuple(sorted({n for n in dense if n not in layers}))
    return ServingBase(layers, tensors, dense_linears, getattr(inner, "config", None))


def _peft_adapter_name(model: Any, adapter_name: str | None) -> str:
    names = sorted(model.peft_config)
    if adapter_name is None:
        active = model.active_adapter
        adapter_name = active[0] if isinstance(active, (list, tuple)) else active
    if adapter_name not in model.peft_config:
        raise ValueError(f"the PEFT model has no adapter {adapter_name!r}; its adapters are {names}")
    return str(adapter_name)


def _check_adapter(model: Any, adapter_name: str | None) -> str | None:
    """Refuse adapters the GPTQ + LoRA engines cannot load, before anything is written."""
    if _is_peft(model):
        name = _peft_adapter_name(model, adapter_name)
        cfg = model.peft_config[name]
        kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
        if kind != "LORA":
            raise ValueError(f"adapter {name!r} is a {kind} adapter; the serving export writes LoRA adapters only")
        if getattr(cfg, "use_dora", False):
            raise ValueError(
                f"adapter {name!r} is DoRA (use_dora=True), which engines serving a quantized base with LoRA do "
                "not load (nor does PEFT over GPTQ layers); merge it instead (lqmod.integrations.merge.merge_to_dense)"
            )
        return name
    if adapter_name is not None:
        raise ValueError("adapter_name applies to PEFT models only; an lqmod model has one adapter per layer")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(
            "the model has no adapters to export: give an lqmod model (LoRALinear layers) or a PEFT model "
            "(peft.get_peft_model over a model loaded with LqmodConfig)"
        )
    variants = sorted({getattr(m.lora_config, "adapter", "lora") for m in layers})
    if variants != ["lora"]:
        raise ValueError(
            f"the model's adapters are {variants}; engines serving a quantized base with LoRA load plain LoRA "
            "only: serve a dense model with the adapters merged instead (each layer's merged_weight())"
        )
    return None


def _scalings(model: Any, name: str | None) -> dict[str, float]:
    """Plain module name -> the factor its adapter update is multiplied by (alpha / r, or
    alpha / sqrt(r) with rsLoRA; per module under PEFT's alpha/rank patterns)."""
    if not _is_peft(model):
        return {n: float(m.scaling) for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    out: dict[str, float] = {}
    for module_name, module in model.get_base_model().named_modules():
        scaling = getattr(module, "scaling", None)
        plain = _plain(module_name)
        if isinstance(scaling, dict) and name in scaling and plain is not None:
            out[plain] = float(scaling[name])
    return out


def _fold_scaling(folder: Path, scalings: Mapping[str, float]) -> None:
    """Multiply every ``lora_B`` by its module's scaling and make the config's scaling 1
    (``lora_alpha = r`` everywhere, no rsLoRA): the same update for PEFT and vLLM, and the
    right one for loaders that apply ``B A`` without ``alpha / r`` (GPTQModel's ``adapter=``)."""
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    for key, t in tensors.items():
        for suffix in (".lora_B.weight", ".lora_embedding_B"):
            if key.endswith(suffix):
                plain = key.removeprefix("base_model.model.").removesuffix(suffix)
                if plain not in scalings:
                    raise ValueError(f"adapter tensor {key} has no matching LoRA module in the model")
                tensors[key] = (t.double() * scalings[plain]).to(t.dtype)
    write_safetensors(tensors, file, metadata={"format": "pt"})
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = cfg["r"]
    cfg["alpha_pattern"] = dict(cfg.get("rank_pattern") or {})
    cfg["use_rslora"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _write_adapter(model: Any, folder: Path, name: str | None, base_path: str | None, fold: bool) -> None:
    scalings = _scalings(model, name) if fold else {}
    if _is_peft(model):
        assert name is not None
        # The embeddings are frozen and written with the base; PEFT would copy them into the
        # adapter whenever "lm_head" or "embed_tokens" is a LoRA target.
        model.save_pretrained(str(folder), selected_adapters=[name], save_embedding_layers=False)
        if name != "default":  # PEFT puts any other adapter in a subfolder of its name
            for item in (folder / name).iterdir():
                shutil.move(str(item), str(folder / item.name))
            (folder / name).rmdir()
        cfg_path = folder / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_path
        cfg["inference_mode"] = True
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    else:
        export_peft(model, folder, base_model_name_or_path=base_path)
    if fold:
        _fold_scaling(folder, scalings)


def export_for_serving(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    base_format: str,
    tokenizer: Any = None,
    adapter_name: str | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    fold_scaling: bool = True,
    options: Mapping[str, Any] | None = None,
) -> ServingExport:
    """Write ``model``'s quantized base in ``base_format`` and its LoRA adapter in PEFT's format.

    ``tokenizer`` (anything with ``save_pretrained``) is saved into ``base/``: GPTQModel and
    the engines load it from there. ``adapter_name`` picks one adapter of a PEFT model (the
    active one by default). ``base_model_name_or_path`` goes into ``adapter_config.json``
    (default: the absolute path of ``base/``). ``fold_scaling`` (default) writes ``lora_B``
    already multiplied by ``alpha / r`` and ``lora_alpha = r``: the same model for PEFT and
    vLLM, and the only correct one for loaders that ignore ``lora_alpha`` (GPTQModel's own
    ``adapter=Lora(...)``); ``False`` keeps the trained tensors and alpha as they are.
    ``options`` go to the format's writer (for
    ``gptq``: ``checkpoint_format`` ``"gptq"`` or ``"gptq_v2"``). Every check runs before
    anything is written; the output is atomic. The model is not modified.
    """
    fmt = formats.base_format(base_format)
    unknown = sorted(set(options or {}) - set(fmt.options))
    if unknown:
        raise ValueError(f"serving format {fmt.name!r} takes options {list(fmt.options)}, not {unknown}")
    base = collect_base(model)
    _check_layers(base, fmt)
    name = _check_adapter(model, adapter_name)
    target = Path(path)
    base_path = base_model_name_or_path or str(target.resolve() / "base")
    with atomic_dir(target, overwrite=overwrite) as tmp:
        (tmp / "base").mkdir()
        fmt.write(base, tmp / "base", dict(options or {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "base"))
        _write_adapter(model, tmp / "adapter", name, base_path, fold_scaling)
        quantizers = tuple(sorted({layer.qweight.quantizer for layer in base.layers.values()}))
        record = {
            "base_format": fmt.name,
            "base": "base",
            "adapter": "adapter",
            "quantizers": list(quantizers),
            "quantized_layers": len(base.layers),
            "dense_linears": list(base.dense_linears),
            "tokenizer": tokenizer is not None,
            "adapter_scaling_folded": fold_scaling,
            "lqmod_version": _version(),
        }
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True))
    return ServingExport(target, target / "base", target / "adapter", fmt.name, quantizers, len(base.layers))


def export_gptq_peft(model: nn.Module, path: str | os.PathLike[str], **kwargs: Any) -> ServingExport:
    """:func:`export_for_serving` with the ``gptq`` base format: a GPTQ checkpoint (GPTQModel,
    vLLM, TGI) and a PEFT LoRA adapter. Every quantized layer must be OPTQ's.
    ``checkpoint_format="gptq_v2"`` (keyword) writes GPTQ v2 zero points."""
    options = {k: kwargs.pop(k) for k in ("checkpoint_format",) if k in kwargs}
    return export_for_serving(model, path, base_format="gptq", options=options, **kwargs)


def _check_layers(base: ServingBase, fmt: BaseFormat) -> None:
    if not base.layers:
        raise ValueError(
            f"the model has no quantized layers; the {fmt.name!r} format holds layers quantized with "
            f"{', '.join(fmt.quantizers)}"
        )
    wrong = sorted(n for n, layer in base.layers.items() if layer.qweight.quantizer not in fmt.quantizers)
    if wrong:
        kinds = sorted({base.layers[n].qweight.quantizer for n in wrong})
        raise ValueError(
            f"the {fmt.name!r} serving format holds layers quantized with {', '.join(fmt.quantizers)} only; "
            f"{len(wrong)} layer(s) use {', '.join(kinds)} (e.g. {wrong[0]}): quantize them with "
            f"{' or '.join(fmt.quantizers)}, or export a dense merged model (lqmod.integrations.merge.merge_to_dense)"
        )


def _version() -> str:
    import lqmod

    return str(lqmod.__version__)
