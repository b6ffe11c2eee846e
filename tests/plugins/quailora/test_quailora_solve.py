"""The rank-r calibrated-error minimisers of quailora, against float64 references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lqmod_quailora.solve import (
    als_lowrank,
    balance,
    calibrated_error,
    damped_hessian,
    exact_lowrank,
    root_of,
)


def problem(out_f: int, in_f: int, seed: int, n: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An error matrix E, inputs X with uneven correlated features, and H = X^T X."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    mix = torch.randn(in_f, in_f, generator=gen, dtype=torch.float64)
    scales = torch.logspace(-1, 1, in_f, dtype=torch.float64)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64) @ mix * scales
    return e, x, x.T @ x


def objective(e: torch.Tensor, low: torch.Tensor, hd: torch.Tensor) -> float:
    d = e - low
    return float(torch.trace(d @ hd @ d.T))


def test_calibrated_error_is_the_output_error() -> None:
    e, x, h = problem(7, 5, 0)
    assert calibrated_error(e, h) == pytest.approx(float((e @ x.T).norm()), rel=1e-12)


def test_damping_adds_a_relative_ridge() -> None:
    _, _, h = problem(4, 6, 1)
    hd = damped_hessian(h, 0.05)
    lam = 0.05 * float(torch.diagonal(h).mean())
    torch.testing.assert_close(hd, h + lam * torch.eye(6, dtype=torch.float64))
    # All-zero statistics (a layer whose inputs were all zero) still give a usable metric.
    torch.testing.assert_close(damped_hessian(torch.zeros(3, 3), 0.5), 0.5 * torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="damp must be > 0"):
        damped_hessian(h, 0.0)
    with pytest.raises(ValueError, match="square"):
        damped_hessian(torch.zeros(3, 4), 0.1)


@pytest.mark.parametrize(("shape", "rank"), [((12, 9), 1), ((12, 9), 3), ((9, 12), 4), ((20, 16), 8)])
def test_exact_beats_random_perturbations(shape: tuple[int, int], rank: int) -> None:
    e, _, h = problem(*shape, seed=rank)
    hd = damped_hessian(h, 0.01)
    best = exact_lowrank(e, hd, rank)
    f_best = objective(e, best.product, hd)
    assert best.objective == pytest.approx(f_best, rel=1e-10)
    gen = torch.Generator().manual_seed(3)
    for eps in (1e-1, 1e-3, 1e-5):
        for _ in range(20):
            b = best.b + eps * torch.randn(best.b.shape, generator=gen, dtype=torch.float64) * best.b.norm()
            a = best.a + eps * torch.randn(best.a.shape, generator=gen, dtype=torch.float64) * best.a.norm()
            assert objective(e, b @ a, hd) >= f_best * (1 - 1e-12)
    # ... and any other rank-r matrix, e.g. the unweighted SVD truncation of E.
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert objective(e, plain, hd) > f_best


def _brute_force_rank1(e: torch.Tensor, hd: torch.Tensor, steps: int) -> float:
    """min over unit column directions u (2 or 3 rows): for fixed u the best L = u u^T E (the
    weight sits on the right), so f(u) = ||(I - u u^T) E C||_F^2 on a dense grid of directions."""
    c = root_of(hd)
    m = e @ c
    if e.shape[0] == 2:
        theta = torch.linspace(0, math.pi, steps, dtype=torch.float64)
        dirs = torch.stack([theta.cos(), theta.sin()], dim=1)
    else:
        k = int(steps**0.5)
        theta = torch.linspace(0, math.pi, k, dtype=torch.float64)
        phi = torch.linspace(0, 2 * math.pi, 2 * k, dtype=torch.float64)
        t, p = torch.meshgrid(theta, phi, indexing="ij")
        dirs = torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], dim=-1).reshape(-1, 3)
    proj = dirs @ m  # (n_dirs, in): u^T M
    return float((m.square().sum() - proj.square().sum(dim=1)).min())


@pytest.mark.parametrize(("out_f", "in_f", "seed"), [(2, 3, 0), (2, 5, 1), (3, 4, 2), (3, 2, 3)])
def test_exact_equals_brute_force_on_tiny_cases(out_f: int, in_f: int, seed: int) -> None:
    e, _, h = problem(out_f, in_f, seed, n=10)
    hd = damped_hessian(h, 0.01)
    exact = exact_lowrank(e, hd, 1)
    brute = _brute_force_rank1(e, hd, 200_000 if out_f == 2 else 1_000_000)
    total = float((e @ root_of(hd)).square().sum())  # f at L = 0: the grid's error scales with it
    assert exact.objective <= brute + 1e-12 * total
    assert brute - exact.objective <= 1e-5 * total


def test_exact_does_not_depend_on_the_square_root() -> None:
    # The H^{1/2} (symmetric root) and our Cholesky factor give the same minimiser.
    e, _, h = problem(10, 8, 4)
    hd = damped_hessian(h, 0.01)
    vals, vecs = torch.linalg.eigh(hd)
    sym = (vecs * vals.sqrt()) @ vecs.T
    inv = (vecs / vals.sqrt()) @ vecs.T
    u, s, vh = torch.linalg.svd(e @ sym, full_matrices=False)
    low = (u[:, :3] * s[:3]) @ vh[:3] @ inv
    torch.testing.assert_close(exact_lowrank(e, hd, 3).product, low, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("shape", "rank", "seed"), [((16, 12), 2, 0), ((12, 16), 4, 1), ((30, 20), 6, 2)])
def test_als_is_monotone_and_converges_to_exact(shape: tuple[int, int], rank: int, seed: int) -> None:
    e, _, h = problem(*shape, seed=seed)
    hd = damped_hessian(h, 0.01)
    exact = exact_lowrank(e, hd, rank)
    als = als_lowrank(e, hd, rank, max_iters=5000, tol=0.0)
    hist = als.history
    assert len(hist) >= 2
    for before, after in itertools.pairwise(hist):
        assert after <= before * (1 + 1e-12)
    assert hist[0] > exact.objective  # the SVD of E start is not already optimal
    assert als.objective == pytest.approx(exact.objective, rel=1e-8)
    torch.testing.assert_close(als.product, exact.product, rtol=1e-5, atol=1e-6 * float(exact.product.abs().max()))


def test_als_stops_on_tolerance_and_never_ends_above_its_start() -> None:
    e, _, h = problem(16, 12, 5)
    hd = damped_hessian(h, 0.01)
    als = als_lowrank(e, hd, 3, max_iters=1000, tol=1e-3)
    assert len(als.history) < 1001
    assert als.objective <= als.history[0]


def test_balance_keeps_the_product_and_equalises_factors() -> None:
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(9, 3, generator=gen, dtype=torch.float64) * 100
    a = torch.randn(3, 7, generator=gen, dtype=torch.float64) / 100
    b2, a2 = balance(b, a)
    torch.testing.assert_close(b2 @ a2, b @ a)
    torch.testing.assert_close(b2.T @ b2, a2 @ a2.T)
