"""Applying an ``LqmodConfig`` to a model that is already loaded, and marking it quantized."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.quantizers import HfQuantizer

from lqmod.integrations.base import quantize_linears, resolve_entries
from lqmod.integrations.transformers.calibrated import _calibrate_and_quantize
from lqmod.integrations.transformers.config import LqmodConfig
from lqmod.integrations.transformers.hf_quantizer import LqmodHfQuantizer, _skipped
from lqmod.integrations.transformers.records import METHOD, layer_records
from lqmod.model import QuantizeReport
from lqmod.plugins import get_registry
from lqmod.types import LayerStats


def quantize_model(
    model: Any,
    quantization_config: LqmodConfig,
    *,
    stats: Mapping[str, LayerStats] | None = None,
    batches: list[dict[str, torch.Tensor]] | None = None,
    progress: bool = False,
) -> QuantizeReport:
    """Apply ``quantization_config`` to an already loaded transformers model, in place.

    The route for quantizers that need calibration statistics (``stats``: module name ->
    :class:`~lqmod.types.LayerStats`, e.g. from ``lqmod.calibration.collect_hessians``; or
    ``batches``, forward-call keyword arguments the missing statistics are computed on; or
    the config's ``calibration`` text, read with the model's tokenizer), and for models
    loaded another way (a GGUF file, which transformers will not combine with a
    quantization config). The model then saves with ``save_pretrained`` and reloads with
    ``from_pretrained`` exactly as if it had been quantized on load.
    """
    if not isinstance(quantization_config, LqmodConfig):
        raise TypeError(f"expected an LqmodConfig, got {type(quantization_config).__name__}")
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None:
        qm = existing.quantization_config.quant_method
        method = str(getattr(qm, "value", qm))
        # transformers loads a GGUF file through a quantizer that dequantizes every tensor:
        # those weights are dense and may be quantized again. Anything else already is.
        if method != "gguf":
            raise ValueError(f"the model is already quantized (method {method!r}); load it dense first")
    cfg = quantization_config
    skip = HfQuantizer.get_modules_to_not_convert(
        model, cfg.modules_to_not_convert or None, getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True
    )
    entries = resolve_entries(model, cfg.quantizer, cfg.config, targets=cfg.targets, plan=cfg.plan)
    if cfg.plan is None:
        entries = {n: e for n, e in entries.items() if not _skipped(n, skip)}
    registry = get_registry()
    if batches is not None or (cfg.calibration is not None and any(
        registry.quantizer(e.quantizer).needs for e in entries.values()
    )):
        report = _calibrate_and_quantize(model, cfg, entries, batches, stats)
    else:
        plan = {"modules": {n: e.model_dump(mode="json") for n, e in entries.items()}}
        report = quantize_linears(model, None, None, plan=plan, stats=stats, progress=progress)
    attach_quantizer(model, cfg).report = report
    return report


def attach_quantizer(model: Any, quantization_config: LqmodConfig | None = None) -> LqmodHfQuantizer:
    """Mark a model holding QuantizedLinear layers as an ``"lqmod"``-quantized transformers model,
    so ``save_pretrained`` writes the quantized tensors and the config that reloads them."""
    cfg = quantization_config or LqmodConfig(quantizer=None, layers={})
    cfg.layers = layer_records(model)
    if not cfg.layers:
        raise ValueError("the model has no lqmod QuantizedLinear layers")
    quantizer = LqmodHfQuantizer(cfg, pre_quantized=False)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = METHOD
    model.config.quantization_config = cfg
    return quantizer
