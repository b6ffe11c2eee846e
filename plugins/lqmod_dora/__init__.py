"""DoRA (weight-decomposed low-rank adaptation) over any quantizer: a built-in adapter variant."""

from __future__ import annotations

from collections.abc import Iterator

import torch

import lqmod
from lqmod.config import AdapterConfig
from lqmod.nn.adapter import Adapter
from lqmod.types import AdapterSpec, PeftForm
from lqmod_dora.adapter import DoRAAdapter, build
from lqmod_dora.validate import validate

__all__ = ["NAME", "DoRAAdapter", "DoRAConfig", "lqmod_adapters"]

NAME = "dora"


class DoRAConfig(AdapterConfig):
    """DoRA has no options beyond ``LoRAConfig``; the norm is always detached (DoRA section 4.3)."""


def peft_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    # PEFT's names (peft.tuners.lora.dora.DoraLinearLayer.weight, saved as lora_magnitude_vector).
    assert isinstance(adapter, DoRAAdapter)
    return {
        "lora_A.weight": adapter.lora_A.detach(),
        "lora_B.weight": adapter.lora_B.detach(),
        "lora_magnitude_vector": adapter.magnitude.detach(),
    }


@lqmod.hookimpl
def lqmod_adapters() -> Iterator[AdapterSpec]:
    yield AdapterSpec(
        NAME,
        DoRAConfig,
        build,
        peft=PeftForm(config={"use_dora": True}, tensors=peft_tensors),
        description="DoRA: magnitude m times the direction (W + s B A) / ||W + s B A|| (PEFT: use_dora=True)",
        validate=validate,
    )
