"""The ``icq`` quantizer against the quantizer contract, over NF-k and integer (rtn) bases."""

from __future__ import annotations

from typing import Any, ClassVar

from lqmod.config import QuantizerConfig
from lqmod.testing import QuantizerContract
from lqmod_icq import ICQConfig


class TestICQContract(QuantizerContract):
    quantizer = "icq"
    shape = (40, 256)
    # tau_n is small here so each option runs quickly; the search is the same at the paper's 51.
    configs: ClassVar[list[dict[str, Any]]] = [
        {"tau_n": 8},
        {"base_config": {"bits": 3, "blocksize": 128}, "tau_n": 8, "tau_groupsize": 16},
        {"base_config": {"bits": 2, "blocksize": 32, "double_quant": False}, "tau_n": 4},
        {"base": "rtn", "base_config": {"bits": 4, "group_size": 64, "symmetric": True}, "tau_n": 8},
        {"base": "rtn", "base_config": {"bits": 3, "group_size": 32}, "tau_n": 8, "tau_range": 0.3},
    ]

    def relative_error_bound(self, config: QuantizerConfig) -> float:
        # Measured on the Gaussian test weight, plain base -> icq: NF4 0.093 -> 0.092, NF3 b128
        # 0.208 -> 0.201, NF2 b32 0.514 -> 0.486, rtn4 sym 0.107 -> 0.103, rtn3 0.170 -> 0.177.
        assert isinstance(config, ICQConfig)
        bits = int(config.base_config["bits"])
        return {2: 0.55, 3: 0.23, 4: 0.12}[bits]
