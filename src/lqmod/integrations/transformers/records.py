"""The per-layer records a saved directory's ``config.json`` holds, and the method's constants."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lqmod.nn.quantized_linear import QuantizedLinear

METHOD = "lqmod"
FORMAT_VERSION = 1
# Saved in place of a quantized layer's dense weight (see the module docstring).
PLACEHOLDER_SUFFIX = ".weight"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the lqmod quantization config")
    return dtype


def layer_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per QuantizedLinear: its quantized weight's header, the tensors' shapes and dtypes, and
    whether it has a bias: what rebuilding the empty layer before loading needs."""
    records: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            qw = module.qweight
            records[name] = {
                "header": qw.header(),
                "tensors": {k: [list(v.shape), _dtype_name(v.dtype)] for k, v in sorted(qw.tensors.items())},
                "bias": module.bias is not None,
                "origin": module.origin,
                "compute_dtype": _dtype_name(module.compute_dtype),
            }
    return records
