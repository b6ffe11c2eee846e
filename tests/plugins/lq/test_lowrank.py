"""Randomized SVD and the Fisher-weighted low-rank fit, against float64 references."""

from __future__ import annotations

import pytest
import torch

from lqmod.quantize import QuantizationError
from lqmod_lq.factors import decode, encode, factor_bits
from lqmod_lq.lowrank import fisher_scales, lowrank_factors, randomized_svd


def matrix_with_spectrum(m: int, n: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(spectrum), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(spectrum), generator=gen, dtype=torch.float64))
    return (u * spectrum) @ v.T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_randomized_svd_matches_exact_svd(dtype: torch.dtype) -> None:
    # A slowly decaying spectrum (1/sqrt(i)), the hard case for a plain sketch.
    spectrum = 1.0 / torch.arange(1, 81, dtype=torch.float64).sqrt()
    a = matrix_with_spectrum(120, 90, spectrum)
    rank = 10
    gen = torch.Generator().manual_seed(0)
    u, s, vh = randomized_svd(a.to(dtype), rank, oversample=10, power_iters=4, generator=gen)
    assert u.shape == (120, rank) and s.shape == (rank,) and vh.shape == (rank, 90)
    torch.testing.assert_close(s.double(), spectrum[:rank], rtol=2e-3, atol=0)
    # Orthonormal factors.
    eye = torch.eye(rank, dtype=torch.float64)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(u.double().T @ u.double(), eye, atol=tol, rtol=0)
    torch.testing.assert_close(vh.double() @ vh.double().T, eye, atol=tol, rtol=0)
    # Eckart-Young: the best rank-r error is sqrt(sum of the trailing sigma^2).
    optimal = float(spectrum[rank:].square().sum().sqrt())
    err = float((a - (u.double() * s.double()) @ vh.double()).norm())
    assert optimal <= err * (1 + 1e-9)
    assert err <= optimal * 1.002


def test_power_iterations_help_on_flat_spectra() -> None:
    spectrum = torch.cat([torch.full((8,), 2.0), torch.full((72,), 1.0)]).double()
    spectrum = spectrum * torch.linspace(1.0, 0.9, 80, dtype=torch.float64)
    a = matrix_with_spectrum(100, 100, spectrum, seed=3)
    optimal = float(spectrum[8:].square().sum().sqrt())

    def err(q: int) -> float:
        u, s, vh = randomized_svd(a, 8, oversample=4, power_iters=q, generator=torch.Generator().manual_seed(1))
        return float((a - (u * s) @ vh).norm()) / optimal - 1

    assert err(4) < err(0) / 5


def test_randomized_svd_is_seeded() -> None:
    a = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    first = randomized_svd(a, 5, generator=torch.Generator().manual_seed(3))
    second = randomized_svd(a, 5, generator=torch.Generator().manual_seed(3))
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)


def test_randomized_svd_refuses_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank=31"):
        randomized_svd(torch.randn(40, 30), 31)


def test_fisher_scales_exact_for_rank_one_fisher() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.rand(30, generator=gen, dtype=torch.float64) + 0.01
    cols = torch.rand(20, generator=gen, dtype=torch.float64) + 0.01
    fisher = torch.outer(rows, cols)
    sr, sc = fisher_scales(fisher, (30, 20))
    torch.testing.assert_close(torch.outer(sr, sc).square(), fisher, rtol=1e-12, atol=0)


def test_weighted_fit_is_optimal_for_rank_one_fisher() -> None:
    # With F = r c^T, ||sqrt(F) * E|| = ||diag(sqrt r) E diag(sqrt c)||: the weighted SVD is
    # the exact minimiser; compare with the float64 exact weighted optimum.
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    rows = torch.rand(50, generator=gen, dtype=torch.float64).square() + 1e-3
    cols = torch.rand(40, generator=gen, dtype=torch.float64).square() + 1e-3
    fisher = torch.outer(rows, cols)
    sr, sc = fisher_scales(fisher, (50, 40))
    l1, l2 = lowrank_factors(a, 5, row_scale=sr, col_scale=sc, oversample=35, power_iters=3,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    weighted = float((fisher.sqrt() * (a - l1 @ l2)).norm())
    scaled = rows.sqrt()[:, None] * a * cols.sqrt()[None, :]
    optimal = float(torch.linalg.svdvals(scaled)[5:].square().sum().sqrt())
    assert weighted == pytest.approx(optimal, rel=1e-9)
    unweighted_l1, unweighted_l2 = lowrank_factors(a, 5, oversample=35, power_iters=3)
    assert float((fisher.sqrt() * (a - unweighted_l1 @ unweighted_l2)).norm()) > weighted * 1.01


@pytest.mark.parametrize(
    ("fisher", "match"),
    [
        (torch.ones(3, 4), "shape"),
        (-torch.ones(4, 5), "non-negative"),
        (torch.full((4, 5), float("nan")), "finite"),
        (torch.zeros(4, 5), "all zeros"),
    ],
)
def test_fisher_scales_refuse_bad_fisher(fisher: torch.Tensor, match: str) -> None:
    with pytest.raises(QuantizationError, match=match):
        fisher_scales(fisher, (4, 5))


@pytest.mark.parametrize("kind", ["bf16", "fp16", "fp32", "int8"])
def test_factor_storage_round_trip_and_bits(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(30, 4, generator=gen), torch.randn(4, 20, generator=gen)
    l1[:, 2] = 0  # an all-zero component must survive int8 scaling
    stored = encode(l1, l2, kind)
    assert sum(t.numel() * t.element_size() * 8 for t in stored.values()) == factor_bits(kind, (30, 20), 4)
    d1, d2 = decode(stored, kind)
    rtol = {"bf16": 2**-8, "fp16": 2**-11, "fp32": 0.0, "int8": 0.0}[kind]
    if kind == "int8":  # half a step of each component's grid
        assert bool(((d1 - l1).abs() <= l1.abs().amax(0) / 254 + 1e-7).all())
        assert bool(((d2 - l2).abs() <= l2.abs().amax(1, keepdim=True) / 254 + 1e-7).all())
    else:
        torch.testing.assert_close(d1, l1, rtol=rtol, atol=0)
        torch.testing.assert_close(d2, l2, rtol=rtol, atol=0)
    # Decoding the stored form again gives the same bits (materialize runs repeatedly).
    assert torch.equal(decode(stored, kind)[0], d1)
