"""BlockLDLQ: block size 1 with a scalar grid is GPTQ / LDLQ; feedback lowers the proxy loss."""

from __future__ import annotations

import torch

from lqmod_quip.codebooks import e8p_decode, e8p_encode
from lqmod_quip.ldlq import block_ldlq, damped, proxy_loss


def correlated(n: int, seed: int = 0, tokens: int = 400) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, n // 4, generator=gen, dtype=torch.float64)
    x = base @ torch.randn(n // 4, n, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(
        tokens, n, generator=gen, dtype=torch.float64
    )
    return x.T @ x


def gptq_reference(w: torch.Tensor, h: torch.Tensor, step: float) -> torch.Tensor:
    """GPTQ as in Frantar et al. (2022) eq. 2-3, written the slow way: quantize column q,
    spread its error over the remaining columns with H^{-1}, and drop q from H^{-1} by a
    Schur complement. Independent of the Cholesky formulation in lqmod_quip.ldlq."""
    w = w.clone()
    hinv = torch.linalg.inv(h)
    n = w.shape[1]
    out = torch.empty_like(w)
    for q in range(n):
        out[:, q] = torch.round(w[:, q] / step) * step
        err = (w[:, q] - out[:, q]) / hinv[q, q]
        w[:, q + 1 :] -= err.unsqueeze(1) * hinv[q, q + 1 :].unsqueeze(0)
        hinv = hinv - hinv[:, q : q + 1] @ hinv[q : q + 1, :] / hinv[q, q]
    return out


def test_block_size_one_is_gptq() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 24, generator=gen, dtype=torch.float64)
    h = damped(correlated(24), 0.01)
    step = 0.7
    got = block_ldlq(w, h, 1, lambda x, _k: torch.round(x / step) * step)
    torch.testing.assert_close(got, gptq_reference(w, h, step), rtol=0, atol=1e-12)


def test_ldlq_beats_nearest_rounding_on_correlated_hessian() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=gen, dtype=torch.float64)
    h = damped(correlated(64, seed=3), 0.01)
    step = 0.5
    nearest = torch.round(w / step) * step
    ldlq = block_ldlq(w, h, 1, lambda x, _k: torch.round(x / step) * step)
    assert proxy_loss(w, ldlq, h) < 0.7 * proxy_loss(w, nearest, h)


def test_block_ldlq_with_e8p_beats_nearest_vectors() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(24, 64, generator=gen, dtype=torch.float64)
    h = damped(correlated(64, seed=5), 0.01)

    def e8p(x: torch.Tensor, _k: int) -> torch.Tensor:
        return e8p_decode(e8p_encode(x)).reshape(x.shape)

    nearest = e8p(w, 0)
    ldlq = block_ldlq(w, h, 8, e8p)
    assert proxy_loss(w, ldlq, h) < 0.7 * proxy_loss(w, nearest, h)


def test_identity_hessian_means_no_feedback() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor, _k: int) -> torch.Tensor:
        seen.append(x.clone())
        return torch.round(x)

    block_ldlq(w, torch.eye(32, dtype=torch.float64), 8, record)
    torch.testing.assert_close(torch.cat(seen, 1), w, rtol=0, atol=0)


def test_proxy_loss_decomposes_into_block_errors() -> None:
    # tr(E H E^T) = sum_k e_k D_k e_k^T with e_k the rounding error of block k: the loss
    # BlockLDLQ minimises block by block. D_k is the inverse of the Schur complement of the
    # earlier blocks in the leading (k+1)-block principal submatrix of H^{-1}, i.e. the last
    # diagonal block of that submatrix's inverse (independent of the Cholesky route).
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    h = damped(correlated(16, seed=8), 0.01)
    errs: list[torch.Tensor] = []

    def rnd(x: torch.Tensor, _k: int) -> torch.Tensor:
        q = torch.round(x * 2) / 2
        errs.append(x - q)
        return q

    q = block_ldlq(w, h, 4, rnd)
    hinv = torch.linalg.inv(h)
    total = 0.0
    for k, e in enumerate(errs):
        end = 4 * (k + 1)
        d = torch.linalg.inv(hinv[:end, :end])[end - 4 :, end - 4 :]
        total += float(torch.einsum("ij,jk,ik->", e, d, e))
    assert abs(total - proxy_loss(w, q, h)) < 1e-9 * proxy_loss(w, q, h)
