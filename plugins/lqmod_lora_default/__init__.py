"""The default LoRA initializer: A Kaiming-uniform, B zero (as in PEFT and the LoRA paper).

With B = 0 the adapted model's output at step 0 equals the quantized model's exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch

import lqmod
from lqmod.config import InitializerConfig, LoRAConfig
from lqmod.types import InitializerSpec, InitResult, LayerStats, Materialize, QuantizedWeight


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
