"""Serving formats for quantized bases: what a plug-in registers to write its layers for an engine.

A quantizer plug-in whose layers have a form some serving engine loads (OPTQ's is the GPTQ
checkpoint) registers a :class:`BaseFormat` with :func:`register_base_format` when it is
imported; :func:`lqmod.integrations.serving.export_for_serving` then writes a model's base in
that format beside its adapter in PEFT's. The core never names a format's plug-in: it looks
formats up by name here. This module imports nothing heavy (plug-ins import it while the
registry loads them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lqmod.types import QuantizedWeight

__all__ = ["BaseFormat", "BaseLayer", "ServingBase", "base_format", "base_formats", "register_base_format"]


@dataclass(frozen=True)
class BaseLayer:
    """One quantized linear layer of a base: its weight, bias and original module type."""

    qweight: QuantizedWeight
    bias: torch.Tensor | None
    origin: str = "linear"  # "conv1d" for a transformers Conv1D ((in, out) weight layout)


@dataclass(frozen=True)
class ServingBase:
    """A model's frozen base under its plain module names (no PEFT or lqmod wrapper names).

    ``layers``: the quantized linear layers; ``tensors``: every other tensor of the model
    (embeddings, norms, dense layers, heads; tied storage once); ``dense_linears``: linear
    layers left unquantized; ``config``: the transformers config, or None.
    """

    layers: dict[str, BaseLayer]
    tensors: dict[str, torch.Tensor]
    dense_linears: tuple[str, ...] = ()
    config: Any = None


@dataclass(frozen=True)
class BaseFormat:
    """A serving format for bases whose every layer was quantized by one of ``quantizers``.

    ``write(base, folder, options)`` writes the files into the existing directory ``folder``
    (the caller makes the write atomic); ``options`` holds only names from ``options``.
    """

    name: str
    quantizers: tuple[str, ...]
    write: Callable[[ServingBase, Path, Mapping[str, Any]], None]
    description: str = ""
    options: tuple[str, ...] = field(default=())


_FORMATS: dict[str, BaseFormat] = {}


def register_base_format(fmt: BaseFormat) -> None:
    """Make ``fmt`` available by name. Registering the same object again is a no-op."""
    if not isinstance(fmt, BaseFormat):
        raise TypeError(f"expected a lqmod.integrations.formats.BaseFormat, got {type(fmt).__name__}")
    known = _FORMATS.get(fmt.name)
    if known is not None and known != fmt:
        raise ValueError(
            f"serving format {fmt.name!r} is already registered (for quantizers {known.quantizers}, "
            f"by {known.write.__module__}); choose another name"
        )
    _FORMATS[fmt.name] = fmt


def base_formats() -> dict[str, BaseFormat]:
    """Every registered serving format, after loading the plug-ins (which register them)."""
    from lqmod.plugins import get_registry

    get_registry().quantizers()
    return dict(_FORMATS)


def base_format(name: str) -> BaseFormat:
    formats = base_formats()
    if name not in formats:
        choices = ", ".join(f"{n} (quantizers: {', '.join(f.quantizers)})" for n, f in sorted(formats.items()))
        raise ValueError(
            f"unknown serving format {name!r}; registered: {choices or '(none: is its plug-in disabled?)'}"
        )
    return formats[name]
