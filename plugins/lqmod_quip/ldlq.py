"""BlockLDLQ: quantize ``b`` columns at a time with feedback of earlier blocks' errors.

Write the damped Hessian as ``H = L^T D L`` (``L`` unit block-lower-triangular, ``D``
block-diagonal, ``b x b`` blocks). With ``e = (W - Q) L^T``,

    tr((W - Q) H (W - Q)^T) = sum_k e_k D_k e_k^T,

and ``e_k`` depends on blocks ``<= k`` only: if each block is rounded *after* adding the
feedback of the earlier blocks' errors, ``e_k`` is exactly that block's own rounding error,
measured in its ``D_k`` norm (QuIP#'s BlockLDLQ). The factors come from the upper Cholesky
factor ``U`` of ``H^{-1}``: ``N = blockdiag(U_kk)^{-1} U`` is unit block-upper, ``W - Q = e N``
and the update after block ``k`` is ``W[:, later] -= e_k N[k, later]`` (GPTQ's update, with
vector blocks), ``D_k = (U_kk^T U_kk)^{-1}``. ``b = 1`` with a scalar grid is LDLQ / GPTQ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lqmod.quantize import QuantizationError

RoundBlock = Callable[[torch.Tensor, int], torch.Tensor]


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` (float64); an all-zero H becomes the identity."""
    h = hessian.to(torch.float64).clone()
    h = (h + h.T) / 2
    mean_diag = float(torch.diagonal(h).mean())
    if not mean_diag > 0:
        return torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    h.diagonal().add_(damp * mean_diag)
    return h


def feedback_factor(hessian: torch.Tensor, block: int) -> torch.Tensor:
    """``N``: the unit block-upper matrix with ``W - Q = e N`` (rows of diagonal blocks = I)."""
    n = hessian.shape[0]
    try:
        chol = torch.linalg.cholesky(hessian)
        upper = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    except torch.linalg.LinAlgError:
        raise QuantizationError(
            "the damped Hessian is not positive definite; raise `damp` (e.g. 0.1) or calibrate on more tokens"
        ) from None
    fb = torch.zeros_like(upper)
    for k in range(0, n, block):
        blk = slice(k, k + block)
        fb[blk, k:] = torch.linalg.solve_triangular(upper[blk, blk], upper[blk, k:], upper=True)
    return fb


def block_ldlq(weight: torch.Tensor, hessian: torch.Tensor, block: int, round_block: RoundBlock) -> torch.Tensor:
    """Quantize ``weight`` (m, n) block by block; ``round_block(x (m, block), k)`` returns the
    quantized block (and may record codes). Returns the quantized matrix (float64)."""
    n = weight.shape[1]
    if n % block:
        raise QuantizationError(f"in_features={n} is not a multiple of the block size {block}")
    fb = feedback_factor(hessian, block)
    work = weight.to(torch.float64).clone()
    out = torch.empty_like(work)
    for k in range(0, n, block):
        blk = slice(k, k + block)
        q = round_block(work[:, blk], k // block)
        out[:, blk] = q
        err = work[:, blk] - q
        if k + block < n:
            work[:, k + block :] -= err @ fb[blk, k + block :]
    return out


def proxy_loss(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)`` in float64."""
    e = weight.to(torch.float64) - quantized.to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", e, hessian.to(torch.float64), e))
