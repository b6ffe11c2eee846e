"""The checkpoint being written while the model streams past: tensors to the spool, headers to the manifest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lqmod.model import replace_module
from lqmod.nn.lora_linear import LoRALinear


def _free(module: nn.Module) -> None:
    """Drop a module's tensors (they were written): meta tensors of the same shapes."""
    module.to("meta")


class _Writer:
    """The checkpoint being written: tensors to the spool, layer headers to the manifest."""

    def __init__(self, spool: Any, model: nn.Module) -> None:
        self.spool = spool
        self.model = model
        self.headers: dict[str, dict[str, Any]] = {}
        self.lora_json: set[str] = set()

    def layer(self, name: str, m: LoRALinear) -> None:
        from lqmod.io import layer_header

        for key, t in m.state_dict().items():
            self.spool.add(f"{name}.{key}", t)
        self.headers[name] = layer_header(m)
        self.lora_json.add(m.lora_config.model_dump_json())
        # Out of the model altogether: a layer's QuantizedWeight holds its tensors beside the
        # module's buffers, so moving the module to meta would keep the quantized model alive.
        replace_module(self.model, name, nn.Identity())

    def tensors(self, items: Mapping[str, torch.Tensor]) -> None:
        for key, t in items.items():
            self.spool.add(key, t)


def _plain_tensors(model: nn.Module, targets: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """State-dict names outside the quantized layers, and tied ones (alias -> kept name).

    The kept name of a tied tensor is its first name in state-dict order, as
    :func:`lqmod.io.save_checkpoint` keeps it.
    """
    prefixes = tuple(f"{t}." for t in targets)
    plain: list[str] = []
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(prefixes):
            continue
        if id(t) in first and t.numel():
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        plain.append(name)
    return plain, aliases
