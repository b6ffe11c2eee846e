"""Orthogonal "Hadamard-like" transforms of any order, applied in Kronecker form.

An order ``n = 2^a * m`` (``m`` odd) is factored as ``K (x) W`` with ``W`` a Sylvester
Walsh-Hadamard matrix of power-of-two order and ``K`` a small Hadamard matrix of order
``2^b * m`` built by Paley's constructions (I: ``q + 1`` for a prime ``q = 3 mod 4``;
II: ``2(q + 1)`` for a prime ``q = 1 mod 4``); e.g. 384 = 12 * 32, 576 = 36 * 16,
1536 = 12 * 128. When no such ``K`` exists (an odd order, or ``m`` too large for the
powers of two available, e.g. 56 = 28 * 2 needs Paley I with 27, not a prime) the odd part
gets a random orthogonal factor drawn from a seeded Gaussian (QR with sign fix, i.e. Haar
distributed); it mixes as well and is still exactly orthogonal in float64.

Everything is float64 and normalised, so ``inverse(apply(x)) == x`` to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

MAX_PALEY_ORDER = 4096


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    f = 2
    while f * f <= q:
        if q % f == 0:
            return False
        f += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """The q x q Jacobsthal matrix Q[i, j] = chi(j - i), chi the quadratic character mod q."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    for x in range(1, q):
        chi[(x * x) % q] = 1.0
    idx = torch.arange(q)
    return chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime with q = 3 mod 4."""
    jac = _jacobsthal(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q prime with q = 1 mod 4."""
    jac = _jacobsthal(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = jac
    pos = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    neg = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    # C's zeros (the diagonal) become `pos`, its +-1 entries +-`neg`.
    return torch.kron(c, neg) + torch.kron(torch.eye(q + 1, dtype=torch.float64), pos)


@cache
def paley_hadamard(order: int) -> torch.Tensor | None:
    """An unnormalised +-1 Hadamard matrix of ``order`` from Paley I or II, or None."""
    if order % 4 or order < 4:
        return None
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return _paley1(order - 1)
    half = order // 2
    if _is_prime(half - 1) and (half - 1) % 4 == 1:
        return _paley2(half - 1)
    return None


def sylvester(order: int) -> torch.Tensor:
    """The +-1 Walsh-Hadamard matrix of a power-of-two order."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester order must be a power of two, got {order}")
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.kron(h, base)
    return h


def random_orthogonal(order: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix from a seeded Gaussian (float64)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(order, order, generator=gen, dtype=torch.float64))
    return (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).unsqueeze(0)).contiguous()


@dataclass(frozen=True)
class KronTransform:
    """The orthogonal ``(small (x) walsh)`` of order ``small.shape[0] * walsh.shape[0]``, normalised.

    ``kind`` says how ``small`` was made: "sylvester" (order 1), "paley" or "random".
    """

    small: torch.Tensor
    walsh: torch.Tensor
    kind: str

    @property
    def order(self) -> int:
        return self.small.shape[0] * self.walsh.shape[0]

    def dense(self) -> torch.Tensor:
        return torch.kron(self.small, self.walsh)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T^T`` along the last dimension (float64)."""
        p, q = self.small.shape[0], self.walsh.shape[0]
        y = x.to(torch.float64).reshape(*x.shape[:-1], p, q)
        y = torch.matmul(torch.matmul(self.small, y), self.walsh.T)
        return y.reshape(x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T`` along the last dimension: undoes :meth:`apply`."""
        p, q = self.small.shape[0], self.walsh.shape[0]
        y = x.to(torch.float64).reshape(*x.shape[:-1], p, q)
        y = torch.matmul(torch.matmul(self.small.T, y), self.walsh)
        return y.reshape(x.shape)

    def inverse_along(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """:meth:`inverse` along dimension ``dim`` (0 or 1) of a 2-D ``x``, in ``x``'s dtype.

        The Walsh factor runs as a fast Walsh-Hadamard transform, O(n log n), in place in
        ``x`` (which it overwrites); only the small Paley/random factor is a matmul. The
        transform is unnormalised here: the caller folds ``1/sqrt(q)`` into a scaling it
        does anyway (:meth:`walsh_norm`).
        """
        p, q = self.small.shape[0], self.walsh.shape[0]
        rows, cols = x.shape
        x = x.contiguous()
        # (pre, p, q, post): the transformed axis split into its Kronecker factors.
        if dim == 0:
            view = x.view(1, p, q, cols)
        elif dim == 1:
            view = x.view(rows, p, q, 1)
        else:
            raise ValueError(f"dim must be 0 or 1, got {dim}")
        fwht_(view.view(view.shape[0] * p, q, view.shape[3]))
        if p > 1:
            small_t = self.small.T.to(x.dtype)
            # small^T along the p axis: one (p x p) @ (p x rest) matmul per leading index.
            view = torch.matmul(small_t, view.reshape(view.shape[0], p, q * view.shape[3]))
            x = view.reshape(rows, cols)
        return x

    @property
    def walsh_norm(self) -> float:
        """The normalisation :meth:`inverse_along` leaves out: ``1 / sqrt(q)``."""
        return 1.0 / self.walsh.shape[0] ** 0.5


def fwht_(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of ``x`` (pre, q, post) along its middle axis, in place.

    Sylvester order: ``H_q x`` with ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``;
    log2(q) butterfly passes sharing one temporary of half of ``x`` (one buffer for all of
    them: a fresh one per pass would be two alive at once, and fresh pages cost a fault each).
    """
    pre, q, post = x.shape
    if q & (q - 1):
        raise ValueError(f"Walsh-Hadamard order must be a power of two, got {q}")
    if q == 1:
        return x
    buf = torch.empty(pre * (q // 2) * post, dtype=x.dtype, device=x.device)
    h = 1
    while h < q:
        v = x.view(pre, q // (2 * h), 2, h, post)
        a, b = v[:, :, 0], v[:, :, 1]
        diff = buf.view(a.shape)
        torch.sub(a, b, out=diff)
        a.add_(b)
        b.copy_(diff)
        h *= 2
    return x


@cache
def transform(order: int, fallback_seed: int = 0) -> KronTransform:
    """The orthogonal transform used for dimension ``order`` (any positive integer)."""
    if order < 1:
        raise ValueError(f"transform order must be positive, got {order}")
    a, m = 0, order
    while m % 2 == 0:
        m //= 2
        a += 1
    if m == 1:
        walsh = sylvester(order) / order**0.5
        return KronTransform(torch.ones(1, 1, dtype=torch.float64), walsh, "sylvester")
    for b in range(2, a + 1):
        small_order = (1 << b) * m
        if small_order > MAX_PALEY_ORDER:
            break
        had = paley_hadamard(small_order)
        if had is not None:
            w = 1 << (a - b)
            return KronTransform(had / small_order**0.5, sylvester(w) / w**0.5, "paley")
    # No Hadamard factor: the odd part mixes through a seeded random orthogonal matrix.
    w = 1 << a
    return KronTransform(random_orthogonal(m, 0x51D + 7919 * fallback_seed + m), sylvester(w) / w**0.5, "random")
