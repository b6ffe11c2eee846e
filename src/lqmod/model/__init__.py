"""Quantize a whole model: swap chosen linear layers for :class:`LoRALinear`, layer by layer.

Works on any ``torch.nn.Module``; Hugging Face transformers models (Llama, BERT, GPT-2 ...)
are the main users. GPT-2's ``Conv1D`` stores its weight transposed (in, out); it is handled
by transposing, so the quantized weight is always (out, in).

Modules: :mod:`~lqmod.model.targets` (which layers), :mod:`~lqmod.model.layer_quantizer`
(one layer at a time, with rollback), :mod:`~lqmod.model.whole_model` (:func:`quantize_model`),
:mod:`~lqmod.model.adapters` (the adapted layers), :mod:`~lqmod.model.reports`.
"""

from __future__ import annotations

from lqmod.model.adapters import convert_adapters, iter_lora_layers, lora_parameters, set_adapters_enabled
from lqmod.model.layer_quantizer import LayerQuantizer, build_lora_linear, missing_stats_message
from lqmod.model.reports import LayerReport, QuantizeReport, size_bytes
from lqmod.model.targets import _dense_weight as _dense_weight
from lqmod.model.targets import find_targets, replace_module
from lqmod.model.whole_model import quantize_model

__all__ = [
    "LayerQuantizer",
    "LayerReport",
    "QuantizeReport",
    "build_lora_linear",
    "convert_adapters",
    "find_targets",
    "iter_lora_layers",
    "lora_parameters",
    "missing_stats_message",
    "quantize_model",
    "replace_module",
    "set_adapters_enabled",
    "size_bytes",
]
