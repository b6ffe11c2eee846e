"""lqmod: LoRA finetuning of low-precision models where the quantizer is a plug-in.

``import lqmod`` is cheap: it imports neither triton nor transformers and touches no GPU.
"""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("lqmod")

from lqmod.config import ConfigError, InitializerConfig, LoRAConfig, QuantizerConfig, TargetConfig  # noqa: E402
from lqmod.nn.lora_linear import LoRALinear  # noqa: E402
from lqmod.plugins import PluginClashError, Registry, UnknownPluginError, get_registry  # noqa: E402
from lqmod.quantize import QuantizationError, quantize_weight  # noqa: E402
from lqmod.types import (  # noqa: E402
    AllocatorSpec,
    InitializerSpec,
    InitResult,
    LayerStats,
    Option,
    QuantizedWeight,
    QuantizerSpec,
)

__version__ = "0.1.0"

__all__ = [
    "AllocatorSpec",
    "ConfigError",
    "InitResult",
    "InitializerConfig",
    "InitializerSpec",
    "LayerStats",
    "LoRAConfig",
    "LoRALinear",
    "Option",
    "PluginClashError",
    "QuantizationError",
    "QuantizedWeight",
    "QuantizerConfig",
    "QuantizerSpec",
    "Registry",
    "TargetConfig",
    "UnknownPluginError",
    "__version__",
    "get_registry",
    "hookimpl",
    "quantize_weight",
]
