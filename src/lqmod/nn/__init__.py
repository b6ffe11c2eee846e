"""Modules: the generic quantized LoRA linear layer and the adapter-free quantized base."""

from lqmod.nn.lora_linear import LoRALinear, QuantizedBase
from lqmod.nn.quantized_linear import QuantizedLinear

__all__ = ["LoRALinear", "QuantizedBase", "QuantizedLinear"]
