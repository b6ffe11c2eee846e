"""LQ-LoRA's low-rank plus quantized decomposition over any registered quantizer: a built-in lqmod plug-in.

Registers the quantizers ``lq`` (``W ~ Q + L1 L2`` with the factors stored frozen in the
base) and ``lq-fisher`` (the same, Fisher-weighted; needs ``stats.fisher``), and the LoRA
initializer ``lq-lora`` (the factors become the adapter's starting point). See README.md.
"""

from __future__ import annotations

from collections.abc import Iterator

import lqmod
from lqmod.types import InitializerSpec, QuantizerSpec
from lqmod_lq.decompose import Decomposition, decompose
from lqmod_lq.initializer import LQLoRAInitConfig, initialize
from lqmod_lq.quantizer import (
    FISHER_NAME,
    NAME,
    LQConfig,
    LQFisherConfig,
    bits_per_param,
    fisher_options,
    make_materialize,
    make_quantize,
    options,
)
from lqmod_lq.validate import validate

__all__ = [
    "Decomposition",
    "LQConfig",
    "LQFisherConfig",
    "LQLoRAInitConfig",
    "decompose",
    "lqmod_initializers",
    "lqmod_quantizers",
]


@lqmod.hookimpl
def lqmod_quantizers() -> Iterator[QuantizerSpec]:
    yield QuantizerSpec(
        name=NAME,
        config_model=LQConfig,
        quantize=make_quantize(NAME),
        materialize=make_materialize(),
        bits_per_param=bits_per_param,
        options=options,
        validate=validate,
        description="LQ-LoRA low-rank + quantized: W ~ base(Q) + L1 L2 over any registered base quantizer",
    )
    yield QuantizerSpec(
        name=FISHER_NAME,
        config_model=LQFisherConfig,
        quantize=make_quantize(FISHER_NAME),
        materialize=make_materialize(),
        bits_per_param=bits_per_param,
        options=fisher_options,
        needs=frozenset({"fisher"}),
        validate=validate,
        description="lq with the objective weighted by a diagonal Fisher (rank-1 row/column approximation)",
    )


@lqmod.hookimpl
def lqmod_initializers() -> Iterator[InitializerSpec]:
    yield InitializerSpec(
        "lq-lora",
        LQLoRAInitConfig,
        initialize,
        description="LQ-LoRA: decompose W ~ Q + L1 L2 with the layer's quantizer; adapters start at L1, L2",
    )
