"""The ``lq`` and ``lq-fisher`` quantizers against the quantizer contract."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lqmod.config import QuantizerConfig
from lqmod.testing import QuantizerContract
from lqmod.types import LayerStats
from lqmod_lq import LQConfig


class TestLQContract(QuantizerContract):
    quantizer = "lq"
    shape = (40, 128)  # small: every option runs the full alternating loop
    # The alternating loop amplifies last-bit differences of multi-threaded BLAS into other
    # codes: lq is reproducible at a fixed torch thread count only (README.md, "Reproducibility").
    thread_count_independent = False
    configs: ClassVar[list[dict[str, Any]]] = [
        {"rank": 4, "max_iters": 5},
        {"rank": 8, "base_config": {"bits": 4, "double_quant": False}, "factor_dtype": "fp16", "max_iters": 5},
        {"rank": 4, "factor_dtype": "int8", "max_iters": 5},
        # A third-party base (lqmod-example-rtn) with fp32 factors.
        {
            "rank": 4,
            "base": "rtn",
            "base_config": {"bits": 3, "group_size": 64},
            "factor_dtype": "fp32",
            "max_iters": 5,
        },
    ]

    def relative_error_bound(self, config: QuantizerConfig) -> float:
        # The base alone measures 0.20 (NF3), 0.09 (NF4) and ~0.2 (RTN3 g64) on the Gaussian
        # test weight; a rank-4/8 part can only lower that (the loop keeps its best iterate).
        assert isinstance(config, LQConfig)
        return {3: 0.21, 4: 0.10}[int(config.base_config["bits"])] if config.base == "nf" else 0.23


class TestLQFisherContract(TestLQContract):
    quantizer = "lq-fisher"

    def stats(self, weight: torch.Tensor) -> LayerStats | None:
        # A positive, uneven Fisher (rows and columns of different importance), fixed per shape.
        gen = torch.Generator().manual_seed(7)
        rows = torch.rand(weight.shape[0], 1, generator=gen, dtype=torch.float64) + 0.1
        cols = torch.rand(1, weight.shape[1], generator=gen, dtype=torch.float64) + 0.1
        noise = torch.rand(weight.shape, generator=gen, dtype=torch.float64) + 0.5
        return LayerStats(fisher=(rows * cols * noise).float())

    def relative_error_bound(self, config: QuantizerConfig) -> float:
        # Weighting moves error from important to unimportant entries: the unweighted error
        # may rise a little above the base's.
        return 1.1 * super().relative_error_bound(config)
