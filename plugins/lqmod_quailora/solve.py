"""The rank-r correction ``L = B A`` minimising the calibrated error ``||(E - B A) X^T||_F``.

``E = W - Q`` is the quantization error, ``H = X^T X`` the layer's input Gram matrix, so the
objective is ``f(B, A) = tr((E - B A) H (E - B A)^T)``. With the damped ``Hd = H + lam I``
(``lam = damp * mean(diag H)``) and any square root ``Hd = C C^T`` (Cholesky here; the
symmetric ``Hd^{1/2}`` gives the same minimiser, see below):

* **exact** (CLoQ / QERA): ``f = ||(E - L) C||_F^2`` and ``L -> L C`` is a bijection of rank-r
  matrices, so the minimiser is ``L* = [E C]_r C^{-1}``, the truncated SVD of ``E C`` mapped
  back (Eckart-Young). Any other root ``C' = C O`` (O orthogonal) gives ``[E C O]_r O^T C^{-1}
  = [E C]_r C^{-1}``: the same L*, unique when ``sigma_r > sigma_{r+1}`` of ``E C``.
* **als** (QuAILoRA's alternating least squares, started at the rank-r SVD of ``E``): for fixed
  A the optimal ``B = E Hd A^T (A Hd A^T)^{-1}``; for fixed B the optimal ``A = (B^T B)^{-1}
  B^T E`` (the weight sits on the right, so it cancels from the normal equations when Hd is
  invertible). Each half step is an exact block minimiser, so f never increases; substituting
  ``A' = A C`` turns the problem into unweighted rank-r approximation of ``E C``, whose local
  minima are all global, so where ALS converges it converges to ``f(L*)``.

Everything is float64. Damping is needed because H is singular whenever the calibration set
has fewer tokens than in_features or dead input features (then ``C^{-1}`` does not exist and
the minimiser is not unique), and it is a regulariser: directions the calibration text never
excites still carry the plain ``||E - B A||_F^2`` objective with weight ``lam``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "LowRank",
    "als_lowrank",
    "balance",
    "calibrated_error",
    "damped_hessian",
    "exact_lowrank",
    "root_of",
]


@dataclass
class LowRank:
    """``L = b @ a`` (b: (out, k), a: (k, in)), its objective value, and the ALS history."""

    b: torch.Tensor
    a: torch.Tensor
    objective: float
    history: list[float] = field(default_factory=list)

    @property
    def product(self) -> torch.Tensor:
        return self.b @ self.a


def damped_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64 (``damp * I`` if H is all zero)."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square (in, in) matrix, got shape {tuple(hessian.shape)}")
    if not damp > 0:
        raise ValueError(f"damp must be > 0 (the ridge keeps H invertible), got {damp}")
    h = hessian.to(torch.float64)
    h = (h + h.T) / 2
    mean_diag = float(torch.diagonal(h).mean())
    lam = damp * mean_diag if mean_diag > 0 else damp
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def root_of(hd: torch.Tensor) -> torch.Tensor:
    """Lower-triangular C with ``C C^T = hd`` (hd symmetric positive definite)."""
    c, info = torch.linalg.cholesky_ex(hd)
    if int(info) != 0:
        raise ValueError(
            "the damped hessian is not positive definite (non-finite or negative-definite statistics?); "
            "check the calibration statistics or raise damp"
        )
    return c


def calibrated_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||delta X^T||_F = sqrt(tr(delta H delta^T))`` for ``H = X^T X`` (no damping)."""
    d = delta.to(torch.float64)
    h = hessian.to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", d, h, d).clamp(min=0).sqrt())


def _objective(e: torch.Tensor, low: torch.Tensor, c: torch.Tensor) -> float:
    return float(((e - low) @ c).square().sum())


def _truncated_svd(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def balance(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product ``b @ a`` as ``U sqrt(S), sqrt(S) V^T`` (equal singular values in both factors)."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s.sqrt()
    return (qb @ u) * root, root.unsqueeze(1) * (vh @ qa.T)


def exact_lowrank(e: torch.Tensor, hd: torch.Tensor, rank: int) -> LowRank:
    """The exact rank-``rank`` minimiser of ``tr((e - L) hd (e - L)^T)`` (hd positive definite)."""
    e = e.to(torch.float64)
    c = root_of(hd)
    k = min(rank, *e.shape)
    u, s, vh = _truncated_svd(e @ c, k)
    root = s.sqrt()
    b = u * root
    # a = sqrt(S) V^T C^{-1}: solve a C = sqrt(S) V^T, C lower triangular.
    a = torch.linalg.solve_triangular(c, root.unsqueeze(1) * vh, upper=False, left=False)
    return LowRank(b, a, _objective(e, b @ a, c))


def _solve_right(rhs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``rhs @ gram^{-1}`` for a symmetric positive semi-definite gram (pseudo-inverse if singular)."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T
    return rhs @ torch.linalg.pinv(gram, hermitian=True)


def als_lowrank(e: torch.Tensor, hd: torch.Tensor, rank: int, *, max_iters: int, tol: float) -> LowRank:
    """QuAILoRA's alternating least squares from the SVD of ``e``; stops when an iteration lowers
    the objective by less than ``tol`` (relative) or after ``max_iters`` iterations."""
    e = e.to(torch.float64)
    c = root_of(hd)
    k = min(rank, *e.shape)
    u, s, vh = _truncated_svd(e, k)
    root = s.sqrt()
    b, a = u * root, root.unsqueeze(1) * vh
    eh = e @ hd
    total = float((eh * e).sum())  # tr(E Hd E^T)

    def objective(b: torch.Tensor, a: torch.Tensor, aha: torch.Tensor) -> float:
        # tr((E - BA) Hd (E - BA)^T) = tr(E Hd E^T) - 2 <B, E Hd A^T> + <B^T B, A Hd A^T>: out*in*r
        # work per iteration instead of the out*in*in of forming (E - BA) C.
        return total - 2 * float((b * (eh @ a.T)).sum()) + float(((b.T @ b) * aha).sum())

    history = [objective(b, a, a @ hd @ a.T)]
    for _ in range(max_iters):
        b = _solve_right(eh @ a.T, a @ hd @ a.T)
        a = _solve_right((e.T @ b), b.T @ b).T
        history.append(objective(b, a, a @ hd @ a.T))
        prev, cur = history[-2], history[-1]
        if prev <= 0 or (prev - cur) <= tol * prev:
            break
    # The last value recomputed directly (the expansion above cancels when f << tr(E Hd E^T)).
    return LowRank(b, a, _objective(e, b @ a, c), history)
