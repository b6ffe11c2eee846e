"""What ``LoRAConfig``'s defaults name: the ``default`` initializer and the ``lora`` adapter variant.

The initializer draws A Kaiming-uniform and sets B to zero (as in PEFT and the LoRA paper),
so the adapted model's output at step 0 equals the quantized model's exactly. The adapter
(:mod:`lqmod_lora_default.adapter`) is plain LoRA, ``x W^T + (alpha / r) B A dropout(x)``.
One plug-in holds both, so a registry built by hand with it can run ``LoRAConfig()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch

import lqmod
from lqmod.config import InitializerConfig, LoRAConfig
from lqmod.types import AdapterSpec, InitializerSpec, InitResult, LayerStats, Materialize, PeftForm, QuantizedWeight
from lqmod_lora_default.adapter import NAME as ADAPTER_NAME
from lqmod_lora_default.adapter import LoRAAdapter, LoRAAdapterConfig, build, peft_tensors
from lqmod_lora_default.validate import validate

__all__ = [
    "DefaultInitConfig",
    "LoRAAdapter",
    "LoRAAdapterConfig",
    "initialize",
    "lqmod_adapters",
    "lqmod_initializers",
]


class DefaultInitConfig(InitializerConfig):
    a_init: Literal["kaiming_uniform", "gaussian"] = "kaiming_uniform"


def initialize(
    *,
    weight: torch.Tensor | None,
    qweight: QuantizedWeight,
    materialize: Materialize,
    lora: LoRAConfig,
    config: DefaultInitConfig,
    stats: LayerStats | None,
    generator: torch.Generator | None,
) -> InitResult:
    out_f, in_f = qweight.shape
    if config.a_init == "gaussian":
        a = torch.randn(lora.r, in_f, generator=generator) / lora.r
    else:
        # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix: bound = 1 / sqrt(in_features).
        bound = 1.0 / math.sqrt(in_f)
        a = (torch.rand(lora.r, in_f, generator=generator) * 2 - 1) * bound
    return InitResult(lora_a=a, lora_b=torch.zeros(out_f, lora.r))


@lqmod.hookimpl
def lqmod_initializers() -> Iterator[InitializerSpec]:
    yield InitializerSpec(
        "default", DefaultInitConfig, initialize, description="A Kaiming-uniform, B = 0 (PEFT's default)"
    )


@lqmod.hookimpl
def lqmod_adapters() -> Iterator[AdapterSpec]:
    yield AdapterSpec(
        ADAPTER_NAME,
        LoRAAdapterConfig,
        build,
        peft=PeftForm(config={}, tensors=peft_tensors),
        description="LoRA: (alpha / r) B A x beside the frozen base (PEFT: LoraConfig)",
        validate=validate,
    )
