"""IR-QLoRA's information elastic connection (IEC) over any quantizer: a built-in adapter variant."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field

import lqmod
from lqmod.config import AdapterConfig
from lqmod.types import AdapterSpec
from lqmod_iec.adapter import IECAdapter, build, check_rank, fitting_ranks
from lqmod_iec.validate import validate

__all__ = ["NAME", "IECAdapter", "IECConfig", "fitting_ranks", "lqmod_adapters"]

NAME = "iec"


class IECConfig(AdapterConfig):
    beta_init: float = Field(0.0, description="initial value of both elastic scalars (IR-QLoRA: 0, so step 0 is LoRA)")


@lqmod.hookimpl
def lqmod_adapters() -> Iterator[AdapterSpec]:
    yield AdapterSpec(
        NAME,
        IECConfig,
        build,
        peft=None,  # PEFT's LoRA layer has no elastic paths: export refuses it
        description="IR-QLoRA IEC: LoRA plus parameter-free group-mean / repeat paths, two learnable scalars",
        check=check_rank,
        validate=validate,
    )
