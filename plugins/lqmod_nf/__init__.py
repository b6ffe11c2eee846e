"""NormalFloat (NF-k) quantization, QLoRA's NF4 at 4 bits: a built-in lqmod plug-in."""

from __future__ import annotations

from collections.abc import Iterator

import lqmod
from lqmod.types import QuantizerSpec
from lqmod_nf.kernel_format import lut_format
from lqmod_nf.quantizer import NAME, NFConfig, bits_per_param, materialize, options, quantize
from lqmod_nf.validate import validate

__all__ = ["NFConfig", "lqmod_quantizers", "materialize", "quantize"]


@lqmod.hookimpl
def lqmod_quantizers() -> Iterator[QuantizerSpec]:
    yield QuantizerSpec(
        name=NAME,
        config_model=NFConfig,
        quantize=quantize,
        materialize=materialize,
        bits_per_param=bits_per_param,
        options=options,
        lut_format=lut_format,
        validate=validate,
        description="NormalFloat k-bit (QLoRA NF4 at bits=4), block-wise absmax, double quantization",
    )
