"""Modules: the generic quantized LoRA linear layer."""

from lqmod.nn.lora_linear import LoRALinear, QuantizedBase

__all__ = ["LoRALinear", "QuantizedBase"]
