"""lqmod: LoRA finetuning of low-precision models where the quantizer is a plug-in.

``import lqmod`` is cheap: it imports neither triton nor transformers and touches no GPU.
"""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("lqmod")

from lqmod._version import lqmod_version  # noqa: E402
from lqmod.config import (  # noqa: E402
    AdapterConfig,
    ConfigError,
    InitializerConfig,
    LoRAConfig,
    QuantizerConfig,
    TargetConfig,
)
from lqmod.nn.lora_linear import LoRALinear  # noqa: E402
from lqmod.plugins import PluginClashError, Registry, UnknownPluginError, get_registry  # noqa: E402
from lqmod.quantize import QuantizationError, quantize_weight  # noqa: E402
from lqmod.types import (  # noqa: E402
    AdapterSpec,
    AllocatorSpec,
    InitializerSpec,
    InitResult,
    LayerStats,
    Option,
    QuantizedWeight,
    QuantizerSpec,
)

# From the installed distribution's metadata (pyproject.toml is the one place it is written).
__version__ = lqmod_version()

__all__ = [
    "AdapterConfig",
    "AdapterSpec",
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
