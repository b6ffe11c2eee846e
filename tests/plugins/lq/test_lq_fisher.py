"""Fisher weighting: lq-fisher trades error on unimportant entries for error on important ones."""

from __future__ import annotations

import pytest
import torch

import lqmod
from lqmod.quantize import quantize_weight
from lqmod.types import LayerStats
from lqmod_lq.decompose import weighted_error


def concentrated_fisher(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Most Fisher mass on a few rows and columns (as for outlier features), not exactly rank-1."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.full((shape[0],), 0.01)
    rows[torch.randperm(shape[0], generator=gen)[:6]] = 10.0
    cols = torch.full((shape[1],), 0.01)
    cols[torch.randperm(shape[1], generator=gen)[:10]] = 10.0
    noise = torch.rand(shape, generator=gen) + 0.5
    return torch.outer(rows, cols) * noise


@pytest.mark.parametrize("seed", [0, 1])
def test_fisher_weighted_error_is_lower(seed: int) -> None:
    registry = lqmod.get_registry()
    lq, lq_fisher = registry.quantizer("lq"), registry.quantizer("lq-fisher")
    gen = torch.Generator().manual_seed(100 + seed)
    w = 0.02 * torch.randn(64, 128, generator=gen)
    fisher = concentrated_fisher((64, 128), seed)
    stats = LayerStats(fisher=fisher)
    cfg = {"rank": 8, "base_config": {"bits": 2}, "factor_dtype": "fp32"}
    plain = quantize_weight(lq, w, cfg, stats)
    weighted = quantize_weight(lq_fisher, w, cfg, stats)
    e_plain = weighted_error(w - lq.materialize(plain, torch.float32), fisher)
    e_weighted = weighted_error(w - lq_fisher.materialize(weighted, torch.float32), fisher)
    assert e_weighted < 0.8 * e_plain, (e_weighted, e_plain)
    # The price: a higher unweighted error (the weighting moved error elsewhere).
    assert float((w - lq_fisher.materialize(weighted, torch.float32)).norm()) > float(
        (w - lq.materialize(plain, torch.float32)).norm()
    )
    assert weighted.meta["error"] == pytest.approx(e_weighted, rel=1e-4)


def test_lq_with_fisher_weighted_flag_equals_lq_fisher() -> None:
    registry = lqmod.get_registry()
    w = 0.02 * torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    stats = LayerStats(fisher=concentrated_fisher((32, 64)))
    a = quantize_weight(registry.quantizer("lq"), w, {"rank": 4, "fisher_weighted": True}, stats)
    b = quantize_weight(registry.quantizer("lq-fisher"), w, {"rank": 4}, stats)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_lq_fisher_refuses_unweighted_config() -> None:
    lq_fisher = lqmod.get_registry().quantizer("lq-fisher")
    stats = LayerStats(fisher=torch.ones(32, 64))
    with pytest.raises(lqmod.config.ConfigError, match="fisher_weighted"):
        quantize_weight(lq_fisher, torch.randn(32, 64), {"fisher_weighted": False}, stats)
