"""IR-QLoRA's information calibration quantization (ICQ) over a LUT-style base: a built-in plug-in.

Registers the quantizer ``icq``: every block (LUT group) of the base is shifted by the ``tau``
near its median that maximises the entropy of its codes, ``tau`` stored in 8 bits with a
second-level float32 scale; ``materialize = base dequant + tau``. See README.md.
"""

from __future__ import annotations

from collections.abc import Iterator

import lqmod
from lqmod.types import QuantizerSpec
from lqmod_icq.config import NAME, ICQConfig
from lqmod_icq.kernel_format import lut_format
from lqmod_icq.quantizer import base_qweight, bits_per_param, materialize, options, quantize, shifts
from lqmod_icq.search import block_codes, block_entropy
from lqmod_icq.validate import validate

__all__ = [
    "ICQConfig",
    "base_qweight",
    "block_codes",
    "block_entropy",
    "lqmod_quantizers",
    "materialize",
    "quantize",
    "shifts",
]


@lqmod.hookimpl
def lqmod_quantizers() -> Iterator[QuantizerSpec]:
    yield QuantizerSpec(
        name=NAME,
        config_model=ICQConfig,
        quantize=quantize,
        materialize=materialize,
        bits_per_param=bits_per_param,
        options=options,
        lut_format=lut_format,
        validate=validate,
        description="IR-QLoRA ICQ: per-block entropy-maximising shift (8-bit, 2nd-level scale) over nf/rtn",
    )
