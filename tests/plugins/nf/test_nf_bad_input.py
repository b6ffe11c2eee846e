"""NF refuses shapes its block size cannot cover, in pricing as well as in quantizing."""

from __future__ import annotations

import pytest
import torch

from lqmod.plugins import get_registry
from lqmod.quantize import QuantizationError


def test_bits_per_param_refuses_what_quantize_refuses() -> None:
    spec = get_registry().quantizer("nf")
    cfg = spec.config_model.model_validate({"bits": 4, "blocksize": 64})
    with pytest.raises(QuantizationError, match=r"in_features=96 .*blocksize=64.*\[16, 32\]"):
        spec.bits_per_param(cfg, (8, 96))
    with pytest.raises(QuantizationError, match="in_features=96"):
        spec.quantize(torch.randn(8, 96), cfg, None)
    # A fitting shape is priced exactly as stored.
    qw = spec.quantize(torch.randn(8, 128), cfg, None)
    assert qw.bits_per_param() == spec.bits_per_param(cfg, (8, 128))
