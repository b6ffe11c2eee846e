"""QuIP#-like 2/3/4-bit lattice quantization (random Hadamard incoherence, BlockLDLQ, E8P)."""

from __future__ import annotations

from collections.abc import Iterator

import lqmod
from lqmod.types import QuantizerSpec
from lqmod_quip.quantizer import NAME, QuipConfig, bits_per_param, materialize, options, quantize
from lqmod_quip.validate import validate

__all__ = ["QuipConfig", "lqmod_quantizers", "materialize", "quantize"]


@lqmod.hookimpl
def lqmod_quantizers() -> Iterator[QuantizerSpec]:
    # No lut_format: an E8P code selects an 8-vector, not one scalar level (see README.md).
    yield QuantizerSpec(
        name=NAME,
        config_model=QuipConfig,
        quantize=quantize,
        materialize=materialize,
        bits_per_param=bits_per_param,
        options=options,
        needs=frozenset({"hessian"}),
        validate=validate,
        description="QuIP#-like: random Hadamard incoherence + BlockLDLQ on the E8P lattice codebook (+ RVQ)",
    )
