"""A LoRA initializer registration (``InitializerSpec``) and what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lqmod.config import InitializerConfig, LoRAConfig
from lqmod.types.quantizers import Materialize
from lqmod.types.weights import LayerStats, QuantizedWeight


@dataclass(frozen=True)
class InitResult:
    """What an initializer returns: A (r, in), B (out, r), and optionally a replacement base.

    Initializers that fold part of the weight into the adapters (LQ-LoRA, LoftQ) return the
    new quantized base in ``qweight``; the others leave it ``None``.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    qweight: QuantizedWeight | None = None


class InitFn(Protocol):
    def __call__(
        self,
        *,
        weight: torch.Tensor | None,
        qweight: QuantizedWeight,
        materialize: Materialize,
        lora: LoRAConfig,
        config: Any,
        stats: LayerStats | None,
        generator: torch.Generator | None,
    ) -> InitResult: ...


@dataclass(frozen=True)
class InitializerSpec:
    """A LoRA initializer registration. ``initialize`` is called once per adapted layer.

    ``needs`` names the calibration statistics ``initialize`` requires (``"hessian"``,
    ``"fisher"``), exactly like :attr:`QuantizerSpec.needs`: ``quantize_model`` refuses a
    layer lacking them before touching the model, and the calibration drivers gather them.
    """

    name: str
    config_model: type[InitializerConfig]
    initialize: InitFn
    description: str = ""
    needs: frozenset[str] = frozenset()
