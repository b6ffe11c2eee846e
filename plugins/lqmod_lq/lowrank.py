"""Rank-r factors of a matrix: randomized SVD, and its Fisher-weighted variant.

The randomized SVD is Halko, Martinsson & Tropp (2011), algorithm 4.4: a Gaussian sketch of
``rank + oversample`` columns, ``power_iters`` subspace iterations (re-orthonormalised after
every product, so the small singular directions are not lost to rounding), then an exact SVD
of the small projected matrix. Each power iteration sharpens the spectrum's decay from
sigma_i to sigma_i^(2q+1), which is what makes the flat spectra of quantization residuals
tractable.
"""

from __future__ import annotations

import torch

from lqmod.quantize import QuantizationError

__all__ = ["fisher_scales", "lowrank_factors", "randomized_svd"]


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (m, rank), S (rank,), Vh (rank, n)`` approximating the top-``rank`` SVD of ``a``.

    Computed in ``a``'s dtype (float32 or float64). The sketch is drawn from ``generator`` on
    the CPU and moved to ``a``'s device, so a seed gives the same factors on every device.
    """
    if a.ndim != 2:
        raise ValueError(f"randomized_svd expects a 2-D matrix, got shape {tuple(a.shape)}")
    m, n = a.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank={rank} must be between 1 and min{tuple(a.shape)}={min(m, n)}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"oversample={oversample} and power_iters={power_iters} must be >= 0")
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, dtype=torch.float64).to(a.device, a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.mT @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def fisher_scales(fisher: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column weights ``(sr (m,), sc (n,))`` with ``sr_i^2 sc_j^2 ~ F_ij``.

    The diagonal Fisher F weights each entry's squared error; a weighted SVD for an arbitrary
    F has no closed form, so F is replaced by its rank-1 "independence" fit
    ``F_ij ~ R_i C_j / S`` (R, C the row and column sums, S the total; exact whenever F is
    itself rank-1, i.e. an outer product of a row and a column importance). Then
    ``||sqrt(F) * E||_F ~ ||diag(sr) E diag(sc)||_F`` with ``sr = sqrt(R / sqrt S)`` and
    ``sc = sqrt(C / sqrt S)``, which an ordinary SVD minimises. LQ-LoRA makes the same rank-1
    approximation (from row and column means; the scale does not change the factors).
    Rows or columns with zero Fisher mass are floored at 1e-6 of the mean weight so that the
    unscaling stays finite: they are not free to be anything, just nearly unimportant.
    """
    if tuple(fisher.shape) != tuple(shape):
        raise QuantizationError(f"fisher has shape {tuple(fisher.shape)}, expected the weight's shape {tuple(shape)}")
    f = fisher.double()
    if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise QuantizationError("fisher must be finite and non-negative (a diagonal empirical Fisher: mean of g^2)")
    rows, cols = f.sum(dim=1), f.sum(dim=0)
    total = rows.sum()
    if not float(total) > 0:
        raise QuantizationError("fisher is all zeros: it carries no weighting (were gradients computed?)")
    rows = rows.clamp(min=1e-6 * float(rows.mean()))
    cols = cols.clamp(min=1e-6 * float(cols.mean()))
    root = total.sqrt()
    return (rows / root).sqrt(), (cols / root).sqrt()


def lowrank_factors(
    a: torch.Tensor,
    rank: int,
    *,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L1 (m, rank), L2 (rank, n)`` with ``L1 @ L2`` the (weighted) best rank-``rank`` fit of ``a``.

    With scales, the fit minimises ``||diag(row_scale) (a - L1 L2) diag(col_scale)||_F``: the
    SVD of the scaled matrix, unscaled afterwards. The singular values are split evenly
    (``U sqrt(S)``, ``sqrt(S) Vh``) so both factors have the same magnitude, which keeps them
    inside the range of a 16-bit storage type.
    """
    scaled = a
    if row_scale is not None:
        scaled = scaled * row_scale.to(a.dtype).unsqueeze(1)
    if col_scale is not None:
        scaled = scaled * col_scale.to(a.dtype).unsqueeze(0)
    u, s, vh = randomized_svd(scaled, rank, oversample=oversample, power_iters=power_iters, generator=generator)
    root = s.sqrt()
    l1, l2 = u * root.unsqueeze(0), vh * root.unsqueeze(1)
    if row_scale is not None:
        l1 = l1 / row_scale.to(a.dtype).unsqueeze(1)
    if col_scale is not None:
        l2 = l2 / col_scale.to(a.dtype).unsqueeze(0)
    return l1, l2
