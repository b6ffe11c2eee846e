"""lqmod-example-rtn: integer round-to-nearest quantization as a third-party lqmod plug-in.

This module is what the distribution's entry point names (``rtn = "lqmod_example_rtn"`` in
the ``lqmod`` group); lqmod imports it when it builds its registry and calls the hook below.
"""

from __future__ import annotations

from collections.abc import Iterator

import lqmod
from lqmod.types import QuantizerSpec
from lqmod_example_rtn.kernel_format import lut_format
from lqmod_example_rtn.quantizer import NAME, RTNConfig, bits_per_param, materialize, options, quantize
from lqmod_example_rtn.validate import validate

__all__ = [
    "RTNConfig",
    "bits_per_param",
    "lqmod_quantizers",
    "lut_format",
    "materialize",
    "options",
    "quantize",
    "validate",
]


@lqmod.hookimpl
def lqmod_quantizers() -> Iterator[QuantizerSpec]:
    yield QuantizerSpec(
        name=NAME,
        config_model=RTNConfig,
        quantize=quantize,
        materialize=materialize,
        bits_per_param=bits_per_param,
        options=options,
        lut_format=lut_format,
        validate=validate,
        description="integer round-to-nearest, 2..8 bits, per-group scales, (a)symmetric",
    )
