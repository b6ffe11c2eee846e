"""The alternating (SVD, quantize) loop: best-iterate keeping, stopping, any registered base."""

from __future__ import annotations

import itertools

import pytest
import torch

import lqmod
from lqmod.config import ConfigError
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.testing import relative_error
from lqmod.types import LayerStats, QuantizedWeight
from lqmod_lq import decompose
from lqmod_lq.quantizer import LQConfig, base_qweight


def structured_weight(shape: tuple[int, int] = (64, 128), rank: int = 4, seed: int = 0) -> torch.Tensor:
    """Noise plus a strong low-rank part: what the decomposition is for."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)
    return 0.02 * torch.randn(shape, generator=gen) + 0.01 * low


def nf_quantize(bits: int = 3) -> tuple[lqmod.QuantizerSpec, object]:
    spec = lqmod.get_registry().quantizer("nf")
    return spec, spec.config_model.model_validate({"bits": bits, "blocksize": 64})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loop_keeps_the_best_iterate(seed: int) -> None:
    spec, cfg = nf_quantize()
    w = structured_weight(seed=seed)
    res = decompose(w, 4, lambda r: quantize_weight(spec, r, cfg), spec.materialize, max_iters=30, tol=0.0)
    errs = res.errors
    assert res.error == min(errs) <= errs[0]
    # Every round but (possibly) the last improved on all before it: the loop stops at the
    # first round that does not, so the kept iterate is the last or the one before it.
    assert all(b < a for a, b in itertools.pairwise(errs[:-1])), errs
    assert res.best >= len(errs) - 2
    # The kept error is the error of what was kept (float64 recomputation).
    dense = spec.materialize(res.qweight, torch.float32).double() + res.l1.double() @ res.l2.double()
    assert float((w.double() - dense).norm()) == pytest.approx(res.error, rel=1e-5)
    # ... and far below the base alone on a weight with low-rank structure.
    alone = float((spec.materialize(quantize_weight(spec, w, cfg), torch.float32) - w).norm())
    assert res.error < 0.8 * alone


def test_loop_returns_first_iterate_when_later_ones_are_worse() -> None:
    # A base that gets worse on every call: the kept iterate must be the first.
    spec, cfg = nf_quantize()
    calls: list[int] = []

    def worsening(residual: torch.Tensor) -> QuantizedWeight:
        calls.append(1)
        noisy = residual + 0.01 * len(calls) * torch.randn(residual.shape, generator=torch.Generator().manual_seed(9))
        return quantize_weight(spec, noisy, cfg)

    w = structured_weight()
    res = decompose(w, 4, worsening, spec.materialize, max_iters=10)
    assert res.best == 0 and len(res.errors) == 2 and res.errors[1] > res.errors[0]


def test_max_iters_caps_the_loop() -> None:
    spec, cfg = nf_quantize()
    res = decompose(structured_weight(), 4, lambda r: quantize_weight(spec, r, cfg), spec.materialize,
                    max_iters=2, tol=0.0)  # fmt: skip
    assert len(res.errors) <= 2
    with pytest.raises(ValueError, match="max_iters"):
        decompose(structured_weight(), 4, lambda r: quantize_weight(spec, r, cfg), spec.materialize, max_iters=0)


def test_decomposition_is_deterministic() -> None:
    lq = lqmod.get_registry().quantizer("lq")
    w = structured_weight()
    a = quantize_weight(lq, w, {"rank": 4, "seed": 3})
    b = quantize_weight(lq, w, {"rank": 4, "seed": 3})
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_third_party_base_rtn() -> None:
    registry = lqmod.get_registry()
    if "rtn" not in registry.quantizers():
        pytest.skip("lqmod-example-rtn is not installed")
    lq, rtn = registry.quantizer("lq"), registry.quantizer("rtn")
    w = structured_weight()
    base_cfg = {"bits": 3, "group_size": 32, "symmetric": True}
    qw = quantize_weight(lq, w, {"base": "rtn", "base_config": base_cfg, "rank": 4, "factor_dtype": "fp32"})
    inner = base_qweight(qw)
    assert inner.quantizer == "rtn" and set(inner.tensors) == {"codes", "scales"}
    # materialize is the rtn weight plus the factors, exactly.
    expected = rtn.materialize(inner, torch.float32) + qw.tensors["l1"] @ qw.tensors["l2"]
    torch.testing.assert_close(lq.materialize(qw, torch.float32), expected, rtol=0, atol=0)
    alone = relative_error(rtn.materialize(quantize_weight(rtn, w, base_cfg), torch.float32), w)
    assert relative_error(lq.materialize(qw, torch.float32), w) < 0.8 * alone
    assert qw.bits_per_param() == lq.bits_per_param(lq.config_model(**qw.config), (64, 128))


def test_config_errors_name_the_problem() -> None:
    lq = lqmod.get_registry().quantizer("lq")
    with pytest.raises(ConfigError, match=r"unknown quantizer 'nope'\. Choose one of"):
        quantize_weight(lq, structured_weight(), {"base": "nope"})
    with pytest.raises(ConfigError, match="base nf config: field 'bits' = 7"):
        quantize_weight(lq, structured_weight(), {"base_config": {"bits": 7}})
    with pytest.raises(ConfigError, match="cannot be its own base"):
        quantize_weight(lq, structured_weight(), {"base": "lq"})
    with pytest.raises(ConfigError, match="factor_dtype"):
        quantize_weight(lq, structured_weight(), {"factor_dtype": "fp8"})
    with pytest.raises(QuantizationError, match="rank=64 must be below min"):
        quantize_weight(lq, structured_weight(), {"rank": 64})
    with pytest.raises(QuantizationError, match="blocksize=256"):
        quantize_weight(lq, structured_weight(), {"base_config": {"blocksize": 256}})
    # The base config is stored complete, so equivalent spellings are one config.
    cfg = lq.config_model.model_validate({"base_config": {"bits": 3}})
    assert isinstance(cfg, LQConfig)
    assert cfg == lq.config_model.model_validate({"base_config": dict(cfg.base_config)})
    assert cfg.base_config["blocksize"] == 64


def test_base_statistics_are_passed_through() -> None:
    lq = lqmod.get_registry().quantizer("lq")
    with pytest.raises(QuantizationError, match=r"needs stats\.fisher"):
        quantize_weight(lq, structured_weight(), {"fisher_weighted": True}, LayerStats())
    with pytest.raises(QuantizationError, match="needs calibration statistics"):
        quantize_weight(lqmod.get_registry().quantizer("lq-fisher"), structured_weight(), {}, None)


def test_options_fit_or_refuse_cleanly() -> None:
    lq = lqmod.get_registry().quantizer("lq")
    opts = list(lq.options())
    assert 6 <= len(opts) <= 10
    for shape in [(384, 384), (1536, 384), (384, 1536), (4096, 4096), (4096, 11008)]:
        for opt in opts:
            assert 2 < lq.bits_per_param(opt, shape) < 4.5, (opt, shape)
    # Ranks a small matrix cannot hold are refused with the ranks that fit.
    for opt in opts:
        assert isinstance(opt, LQConfig)
        if opt.rank < 16:
            assert lq.bits_per_param(opt, (16, 64)) > 0
        else:
            with pytest.raises(QuantizationError, match=r"ranks that fit: 1\.\.15"):
                lq.bits_per_param(opt, (16, 64))
