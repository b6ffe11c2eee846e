"""LoRA (Hu et al., 2021) as an adapter variant: ``y = x W^T + (alpha / r) B A dropout(x)``.

The variant every other one extends, registered like them: the core never names it (only
``LoRAConfig.adapter``'s default does). PEFT loads it as a plain ``LoraConfig``.
"""

from __future__ import annotations

from typing import Any

import torch

from lqmod.config import AdapterConfig, LoRAConfig
from lqmod.nn.adapter import Adapter
from lqmod.nn.quantized_linear import QuantizedLinear

__all__ = ["NAME", "LoRAAdapter", "LoRAAdapterConfig", "build", "peft_tensors"]

NAME = "lora"


class LoRAAdapterConfig(AdapterConfig):
    """LoRA has no options beyond ``LoRAConfig`` (rank, alpha, dropout)."""


class LoRAAdapter(Adapter):
    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base: QuantizedLinear
    ) -> torch.Tensor:
        return base_out + self.lora_update(self.dropout(x)).to(base_out.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)


def build(
    *, base: QuantizedLinear, lora: LoRAConfig, config: Any, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> LoRAAdapter:
    return LoRAAdapter(lora, lora_a, lora_b)


def peft_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {"lora_A.weight": adapter.lora_A.detach(), "lora_B.weight": adapter.lora_B.detach()}
