"""Modules: the frozen quantized base, the adapter base class and the adapted linear layer."""

from lqmod.nn.adapter import Adapter
from lqmod.nn.lora_linear import LoRALinear
from lqmod.nn.quantized_linear import QuantizedBase, QuantizedLinear

__all__ = ["Adapter", "LoRALinear", "QuantizedBase", "QuantizedLinear"]
