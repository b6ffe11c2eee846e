"""The built-in NormalFloat quantizer against the quantizer contract."""

from __future__ import annotations

from typing import Any, ClassVar

from lqmod.config import QuantizerConfig
from lqmod.testing import QuantizerContract
from lqmod_nf import NFConfig


class TestNFContract(QuantizerContract):
    quantizer = "nf"
    configs: ClassVar[list[dict[str, Any]]] = [
        {"bits": bits, "double_quant": dq} for bits in (2, 3, 4) for dq in (False, True)
    ] + [{"bits": 4, "blocksize": 32, "double_quant": True, "dq_blocksize": 16}]

    def relative_error_bound(self, config: QuantizerConfig) -> float:
        # Measured on the Gaussian test weight over seeds 0-2 (blocksize 64): 0.565 / 0.197 /
        # 0.093 at 2 / 3 / 4 bits (NF2 has only 4 levels, one of them 0). ~15% headroom.
        assert isinstance(config, NFConfig)
        return {2: 0.65, 3: 0.23, 4: 0.11}[config.bits]
