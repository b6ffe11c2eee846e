"""The built-in adapter variants (LoRA, DoRA, IEC) against the adapter contract."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from lqmod.testing import AdapterContract


class TestLoRAContract(AdapterContract):
    adapter = "lora"


class TestDoRAContract(AdapterContract):
    adapter = "dora"


class TestIECContract(AdapterContract):
    adapter = "iec"
    configs: ClassVar[list[dict[str, Any]]] = [{}, {"beta_init": 0.5}]

    def starts_as_the_base(self, config: Mapping[str, Any]) -> bool:
        # Non-zero elastic scalars add the group-mean path at step 0 even with B = 0.
        return float(config.get("beta_init", 0.0)) == 0.0
