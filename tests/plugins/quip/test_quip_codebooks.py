"""The E8P and 1-bit E8 codebooks: structure, decoding, exact nearest-entry search."""

from __future__ import annotations

import pytest
import torch

from lqmod_quip.codebooks import (
    E8P_CODES,
    e8_1bit_encode,
    e8_1bit_grid,
    e8p_abs_patterns,
    e8p_decode,
    e8p_encode,
    e8p_grid,
)


def in_e8(v: torch.Tensor) -> torch.Tensor:
    """Row-wise: is the vector in E8 (all integer or all half-integer coords, even sum)?"""
    twice = v * 2
    assert torch.equal(twice, twice.round()), "E8 points have half-integer multiples as coordinates"
    all_int = (v == v.round()).all(1)
    all_half = ((v - 0.5) == (v - 0.5).round()).all(1)
    even = v.sum(1).remainder(2) == 0
    return (all_int | all_half) & even


def test_abs_patterns() -> None:
    pats = e8p_abs_patterns()
    assert pats.shape == (256, 8)
    norms = (pats * pats).sum(1)
    assert int((norms <= 10).sum()) == 227 and int((norms == 12).sum()) == 29
    assert torch.unique(pats.abs(), dim=0).shape[0] == 256
    # |x| over the half-integer coset of E8 within the ball: exactly the 227 small patterns.
    # |coordinate| <= 5/2 within the ball (7/2 alone has norm^2 12.25): 6^8 candidates.
    half = torch.arange(-3, 3, dtype=torch.float64) + 0.5
    grid = torch.cartesian_prod(*[half] * 8)
    grid = grid[(grid.sum(1).remainder(2) == 0) & ((grid * grid).sum(1) <= 10)]
    assert torch.equal(torch.unique(grid.abs(), dim=0), torch.unique(pats[norms <= 10].abs(), dim=0))
    assert in_e8(pats).all(), "each stored pattern carries the sign that puts it in E8"
    big = pats[norms == 12].abs() * 2
    assert ((big == 3).sum(1) == 5).all() and ((big == 1).sum(1) == 3).all()


def test_e8p_grid_structure() -> None:
    grid = e8p_grid()
    assert grid.shape == (E8P_CODES, 8)
    assert torch.unique(grid, dim=0).shape[0] == E8P_CODES, "the 2^16 entries are distinct"
    codes = torch.arange(E8P_CODES)
    shift = torch.where(((codes >> 15) & 1).bool(), -0.25, 0.25).to(torch.float64).unsqueeze(1)
    lattice = grid - shift
    assert in_e8(lattice).all(), "every entry is an E8 point shifted by +-1/4"
    pats = e8p_abs_patterns()
    torch.testing.assert_close(lattice.abs(), pats[codes & 0xFF].abs(), rtol=0, atol=0)
    norms = (lattice * lattice).sum(1)
    assert set(norms.unique().tolist()) == {2.0, 4.0, 6.0, 8.0, 10.0, 12.0}
    # Each pattern appears with 128 sign choices and 2 shifts.
    counts = torch.bincount(codes & 0xFF, minlength=256)
    assert (counts == 256).all()


def test_decode_is_pure_function_of_code() -> None:
    codes = torch.tensor([[0, 1, 255], [256, 32768, 65535]])
    out = e8p_decode(codes)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, e8p_grid()[codes], rtol=0, atol=0)
    # int16 storage wraps codes >= 2^15 to negatives; decode masks them back.
    torch.testing.assert_close(e8p_decode(codes.to(torch.int16)), out, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.1, 0.5, 1.0, 2.0, 4.0])
def test_encode_is_exact_nearest(scale: float) -> None:
    gen = torch.Generator().manual_seed(int(scale * 10))
    x = torch.randn(600, 8, generator=gen, dtype=torch.float64) * scale
    x[0] = 0.0
    x[1] = e8p_grid()[12345]  # a codeword itself
    codes = e8p_encode(x, chunk=256)
    got = ((x - e8p_decode(codes)) ** 2).sum(1)
    brute = torch.cdist(x, e8p_grid()).pow(2).min(1).values
    torch.testing.assert_close(got, brute, rtol=0, atol=1e-12)
    assert int(codes[1]) == 12345


def test_e8p_mse_on_unit_gaussian() -> None:
    # The codebook's whole point: at the chosen scale it beats the best 2-bit scalar
    # quantizer (Lloyd-Max, MSE 0.1175 per dimension) on Gaussian data.
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = 0.96 * e8p_decode(e8p_encode(x / 0.96))
    mse = float(((x - q) ** 2).mean())
    assert 0.085 < mse < 0.095


def test_e8_1bit_grid() -> None:
    grid = e8_1bit_grid()
    assert grid.shape == (256, 8)
    assert torch.unique(grid, dim=0).shape[0] == 256
    assert in_e8(grid).all()
    norms = (grid * grid).sum(1)
    assert int((norms == 0).sum()) == 1 and int((norms == 2).sum()) == 240 and int((norms == 4).sum()) == 15
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = ((x - grid[e8_1bit_encode(x, chunk=64)]) ** 2).sum(1)
    torch.testing.assert_close(got, torch.cdist(x, grid).pow(2).min(1).values, rtol=0, atol=1e-12)
