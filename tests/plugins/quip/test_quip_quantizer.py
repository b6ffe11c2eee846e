"""The quip quantizer end to end: transforms, shapes, storage, refusals."""

from __future__ import annotations

import pytest
import torch

from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.types import LayerStats, QuantizerSpec
from lqmod_quip import QuipConfig, lqmod_quantizers
from lqmod_quip.codebooks import e8p_decode, e8p_encode
from lqmod_quip.hadamard import transform
from lqmod_quip.ldlq import damped, proxy_loss
from lqmod_quip.quantizer import (
    STAGE1_RATIO,
    _from_transformed,
    _hessian_transformed,
    _to_transformed,
    bits_per_param,
)


@pytest.fixture(scope="module")
def spec() -> QuantizerSpec:
    return next(iter(lqmod_quantizers()))


def signs(count: int, seed: int) -> torch.Tensor:
    return 1.0 - 2.0 * torch.randint(0, 2, (count,), generator=torch.Generator().manual_seed(seed)).double()


def gaussian_stats(n: int, seed: int = 0, tokens: int = 600) -> LayerStats:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ (
        torch.eye(n, dtype=torch.float64) + 0.4 * torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    )
    return LayerStats(hessian=x.T @ x, n_tokens=tokens)


@pytest.mark.parametrize("shape", [(384, 384), (576, 1536), (1536, 384), (100, 184), (52, 56)])
def test_incoherence_transform_round_trip(shape: tuple[int, int]) -> None:
    m, n = shape
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(m + n), dtype=torch.float64)
    su, sv = signs(m, 1), signs(n, 2)
    tm, tn = transform(m), transform(n)
    wt = _to_transformed(w, su, sv, tm, tn)
    dense_u = tm.dense() * su.unsqueeze(0)
    dense_v = tn.dense() * sv.unsqueeze(0)
    torch.testing.assert_close(wt, dense_u @ w @ dense_v.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(_from_transformed(wt, su, sv, tm, tn), w, rtol=0, atol=1e-12)
    # The proxy loss is invariant: tr(E H E^T) == tr(E~ H~ E~^T).
    h = gaussian_stats(n).hessian
    assert h is not None
    e = torch.randn(m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ht = _hessian_transformed(h, sv, tn)
    torch.testing.assert_close(ht, dense_v @ h @ dense_v.T, rtol=1e-12, atol=1e-9)
    et = _to_transformed(e, su, sv, tm, tn)
    assert proxy_loss(et, torch.zeros_like(et), ht) == pytest.approx(proxy_loss(e, torch.zeros_like(e), h), rel=1e-10)


def test_identity_hessian_is_nearest_codeword_after_transform(spec: QuantizerSpec) -> None:
    # With H = I there is no feedback: the stored weight must be, exactly, the scaled nearest
    # E8P codeword of every 8-vector of the transformed weight.
    m, n = 24, 48
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.02
    cfg = QuipConfig(bits=2, seed=3)
    qw = quantize_weight(spec, w, cfg, LayerStats(hessian=torch.eye(n, dtype=torch.float64), n_tokens=1))
    sign = signs(m + n, 3)
    tm, tn = transform(m, 3), transform(n, 3)
    wt = _to_transformed(w, sign[:m], sign[m:], tm, tn)
    scale = float(wt.pow(2).mean().sqrt()) * STAGE1_RATIO
    assert float(qw.tensors["scales"][0]) == pytest.approx(scale, rel=1e-6)
    s = float(qw.tensors["scales"][0])
    expected = e8p_decode(e8p_encode(wt.reshape(-1, 8) / s)).reshape(m, n) * s
    torch.testing.assert_close(_to_transformed(spec.materialize(qw, torch.float64), sign[:m], sign[m:], tm, tn),
                               expected, rtol=0, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("shape", [(48, 384), (64, 576), (32, 1536), (100, 184), (384, 48)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_non_power_of_two_shapes(spec: QuantizerSpec, shape: tuple[int, int], bits: int) -> None:
    m, n = shape
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(m * n), dtype=torch.float32) * 0.02
    stats = gaussian_stats(n)
    cfg = QuipConfig(bits=bits)
    qw = quantize_weight(spec, w, cfg, stats)
    assert qw.bits_per_param() == bits_per_param(cfg, shape)
    dense = spec.materialize(qw, torch.float32)
    assert stats.hessian is not None
    rel = (proxy_loss(w, dense, stats.hessian) / proxy_loss(w, torch.zeros_like(w), stats.hessian)) ** 0.5
    assert rel < {2: 0.33, 3: 0.19, 4: 0.11}[bits], f"Hessian-weighted relative error {rel:.3f}"


def test_bits_per_param_accounting() -> None:
    m, n = 384, 1536
    vectors = m * n // 8
    signs_bits = 8 * ((m + n + 7) // 8)
    assert bits_per_param(QuipConfig(bits=2), (m, n)) == (16 * vectors + signs_bits + 32) / (m * n)
    assert bits_per_param(QuipConfig(bits=3), (m, n)) == (24 * vectors + signs_bits + 64) / (m * n)
    assert bits_per_param(QuipConfig(bits=4, scale_dtype="float16"), (m, n)) == (32 * vectors + signs_bits + 32) / (
        m * n
    )


def test_ldlq_lowers_output_error_versus_plain_rounding(spec: QuantizerSpec) -> None:
    # Same transform, same scale, same codebook: BlockLDLQ vs rounding each vector to nearest.
    m, n = 32, 128
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 0.02
    stats = gaussian_stats(n, seed=4, tokens=200)
    assert stats.hessian is not None
    cfg = QuipConfig(bits=2, seed=1)
    q_ldlq = spec.materialize(quantize_weight(spec, w, cfg, stats), torch.float64)
    q_near = spec.materialize(quantize_weight(spec, w, cfg, LayerStats(hessian=torch.eye(n, dtype=torch.float64))),
                              torch.float64)  # fmt: skip
    h = damped(stats.hessian, 0.0)
    assert proxy_loss(w, q_ldlq, h) < 0.9 * proxy_loss(w, q_near, h)


def test_seed_changes_signs_and_is_deterministic(spec: QuantizerSpec) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    stats = gaussian_stats(64)
    a = quantize_weight(spec, w, {"seed": 1}, stats)
    b = quantize_weight(spec, w, {"seed": 1}, stats)
    c = quantize_weight(spec, w, {"seed": 2}, stats)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not torch.equal(a.tensors["signs"], c.tensors["signs"])
    assert a.tensors["signs"].dtype == torch.uint8 and a.tensors["signs"].numel() == (16 + 64) // 8


def test_refusals(spec: QuantizerSpec) -> None:
    w = torch.randn(16, 60)
    with pytest.raises(QuantizationError, match="in_features=60 is not a multiple of 8"):
        quantize_weight(spec, w, {}, LayerStats(hessian=torch.eye(60, dtype=torch.float64)))
    with pytest.raises(QuantizationError, match="multiple of 8"):
        bits_per_param(QuipConfig(), (16, 60))
    w = torch.randn(16, 64)
    with pytest.raises(QuantizationError, match=r"needs \(64, 64\)"):
        quantize_weight(spec, w, {}, LayerStats(hessian=torch.eye(32, dtype=torch.float64)))
    bad = torch.eye(64, dtype=torch.float64)
    bad[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="non-finite"):
        quantize_weight(spec, w, {}, LayerStats(hessian=bad))
    with pytest.raises(QuantizationError, match="needs calibration statistics"):
        quantize_weight(spec, w, {}, None)


def test_zero_weight_and_zero_hessian(spec: QuantizerSpec) -> None:
    w = torch.zeros(8, 16)
    qw = quantize_weight(spec, w, {"bits": 4}, LayerStats(hessian=torch.zeros(16, 16, dtype=torch.float64)))
    dense = spec.materialize(qw, torch.float32)
    # Codewords are never 0 (the 1/4 shift): a zero scale is what stores a zero matrix.
    assert torch.equal(qw.tensors["scales"], torch.zeros(2))
    assert torch.equal(dense, torch.zeros(8, 16))
    tiny = quantize_weight(spec, torch.full((8, 16), 1e-9), {"scale_dtype": "float16"},
                           LayerStats(hessian=torch.eye(16, dtype=torch.float64)))  # fmt: skip
    assert bool(torch.isfinite(spec.materialize(tiny, torch.float32)).all())


def test_config_validation() -> None:
    from lqmod.config import ConfigError, validate_config

    for bad in ({"bits": 1}, {"bits": 8}, {"damp": 0.0}, {"scale_dtype": "bfloat16"}, {"seed": -1}):
        with pytest.raises(ConfigError):
            validate_config(QuipConfig, bad, what="quip")


def test_scale_ratios_are_mse_optimal_on_a_gaussian() -> None:
    # The fixed scale constants are claimed MSE-optimal for a unit Gaussian (what incoherence
    # processing makes of a weight): moving any of them by 8% either way must not help.
    from lqmod_quip.codebooks import e8_1bit_encode, e8_1bit_grid
    from lqmod_quip.quantizer import RESID_RATIO

    x = torch.randn(8000, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def e8p(v: torch.Tensor, s: float) -> torch.Tensor:
        return e8p_decode(e8p_encode(v / s)) * s

    def mse(c1: float, stage2: str | None = None, c2: float = 0.0) -> float:
        q = e8p(x, c1)
        if stage2 == "e8p":
            q = q + e8p(x - q, c2)
        elif stage2 == "e81b":
            q = q + e8_1bit_grid()[e8_1bit_encode((x - q) / c2)] * c2
        return float(((x - q) ** 2).mean())

    for f in (0.92, 1.08):
        assert mse(STAGE1_RATIO) <= mse(STAGE1_RATIO * f)
        c3, c4 = STAGE1_RATIO * RESID_RATIO[3], STAGE1_RATIO * RESID_RATIO[4]
        assert mse(STAGE1_RATIO, "e81b", c3) <= mse(STAGE1_RATIO, "e81b", c3 * f)
        assert mse(STAGE1_RATIO, "e8p", c4) <= mse(STAGE1_RATIO, "e8p", c4 * f)
