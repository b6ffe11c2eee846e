"""The ``quip`` quantizer against the quantizer contract, with a correlated Hessian."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lqmod.config import QuantizerConfig
from lqmod.testing import QuantizerContract
from lqmod.types import LayerStats
from lqmod_quip import QuipConfig


def correlated_hessian(in_features: int, tokens: int = 1024, seed: int = 1) -> LayerStats:
    """``X^T X`` of inputs with correlated features and uneven scales, like a real layer's."""
    gen = torch.Generator().manual_seed(seed)
    mix = (
        torch.eye(in_features, dtype=torch.float64)
        + 0.5 * torch.randn(in_features, in_features, generator=gen, dtype=torch.float64) / in_features**0.5
    )
    scale = torch.exp(torch.randn(in_features, generator=gen, dtype=torch.float64))
    x = torch.randn(tokens, in_features, generator=gen, dtype=torch.float64) @ mix * scale
    return LayerStats(hessian=x.T @ x, n_tokens=tokens)


class TestQuipContract(QuantizerContract):
    quantizer = "quip"
    configs: ClassVar[list[dict[str, Any]]] = [
        {"bits": 2},
        {"bits": 3, "seed": 5},
        {"bits": 4, "scale_dtype": "float16", "damp": 0.05},
    ]

    def stats(self, weight: torch.Tensor) -> LayerStats | None:
        return correlated_hessian(weight.shape[1])

    def relative_error_bound(self, config: QuantizerConfig) -> float:
        # Measured on the Gaussian test weight (48 x 256, the Hessian above), seeds 0-2, float32
        # and bfloat16 input: 0.426 / 0.252 / 0.145 at 2 / 3 / 4 bits. That is more than the
        # codebooks' own RMS error on a unit Gaussian (0.30 / 0.17 / 0.10) because LDLQ moves
        # error to the directions the Hessian (lognormal feature scales) weighs least: the
        # Hessian-weighted relative error is 0.156 / 0.083 / 0.048. ~15% headroom.
        assert isinstance(config, QuipConfig)
        return {2: 0.49, 3: 0.29, 4: 0.17}[config.bits]
