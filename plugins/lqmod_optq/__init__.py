"""OPTQ / GPTQ (Frantar et al. 2022): a built-in lqmod plug-in, with GPTQ checkpoint interop."""

from __future__ import annotations

from collections.abc import Iterator

import lqmod
from lqmod.types import QuantizerSpec
from lqmod_optq import gptq_serving
from lqmod_optq.config import NAME, OPTQConfig, options
from lqmod_optq.kernel_format import lut_format
from lqmod_optq.quantizer import bits_per_param, materialize, quantize
from lqmod_optq.validate import validate

gptq_serving.register()  # the "gptq" serving format (lqmod.integrations.serving)

__all__ = ["OPTQConfig", "bits_per_param", "lqmod_quantizers", "lut_format", "materialize", "options", "quantize"]


@lqmod.hookimpl
def lqmod_quantizers() -> Iterator[QuantizerSpec]:
    yield QuantizerSpec(
        name=NAME,
        config_model=OPTQConfig,
        quantize=quantize,
        materialize=materialize,
        bits_per_param=bits_per_param,
        options=options,
        needs=frozenset({"hessian"}),
        lut_format=lut_format,
        validate=validate,
        description="OPTQ/GPTQ: Hessian-aware rounding with error feedback, 2/3/4/8 bits, groups, act-order",
    )
