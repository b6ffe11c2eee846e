"""QuAILoRA's quantization-aware LoRA initialization over any registered quantizer: a built-in plug-in.

Registers the LoRA initializer ``quailora``: the adapters start at the rank-r ``B A`` that
minimises the calibrated error ``||(W - Q - B A) X^T||_F`` (damped layer Hessian), by the
paper's alternating least squares or the exact closed form. See README.md.
"""

from __future__ import annotations

from collections.abc import Iterator

import lqmod
from lqmod.types import InitializerSpec
from lqmod_quailora.initializer import NAME, QuAILoRAConfig, initialize, solve_layer
from lqmod_quailora.solve import LowRank, als_lowrank, calibrated_error, damped_hessian, exact_lowrank

__all__ = [
    "LowRank",
    "QuAILoRAConfig",
    "als_lowrank",
    "calibrated_error",
    "damped_hessian",
    "exact_lowrank",
    "initialize",
    "lqmod_initializers",
    "solve_layer",
]


@lqmod.hookimpl
def lqmod_initializers() -> Iterator[InitializerSpec]:
    yield InitializerSpec(
        NAME,
        QuAILoRAConfig,
        initialize,
        description="QuAILoRA: B A minimises the calibrated error ||(W - Q - B A) X^T|| (needs stats.hessian)",
        needs=frozenset({"hessian"}),
    )
