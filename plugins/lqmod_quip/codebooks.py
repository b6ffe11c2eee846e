"""The 8-dimensional lattice codebooks: E8P (2 bits/weight) and E8-1bit (the 3-bit residual).

E8P, after QuIP#: every entry is ``s * a + t`` where

- ``a`` is one of 256 "absolute" patterns of half-integers: the 227 distinct ``|x|`` for
  ``x`` in D8 + 1/2 (half-integer vectors with even coordinate sum) with ``||x||^2 <= 10``,
  plus 29 patterns of norm^2 12 (five 3/2 and three 1/2) to fill the byte;
- ``s`` is a sign vector whose coordinate sum ``sum(s * a)`` is even, i.e. ``s * a`` lies in
  the E8 lattice (its half-integer coset). Seven signs are free; the sign of coordinate 0 is
  implied, because flipping one half-integer coordinate changes the sum's parity;
- ``t`` is ``+1/4`` or ``-1/4`` on every coordinate.

A 16-bit code is ``abs_index | signs(1..7) << 8 | shift << 15``: 8 + 7 + 1 bits, 2^16
entries, 2 bits per weight. Decoding is a pure function of the code (:func:`e8p_decode`).

The exact nearest entry is found without scanning all 2^16 entries: for each shift and each
absolute pattern the best signs are those of the input, and when they give an odd sum the
cheapest single flip (smallest ``|y_i| a_i``) restores it (:func:`e8p_encode`).
"""

from __future__ import annotations

import itertools
from functools import cache

import torch

DIM = 8
E8P_CODES = 1 << 16
E8_1BIT_CODES = 1 << 8


@cache
def _norm12_patterns() -> torch.Tensor:
    """29 of the 56 patterns with five 3/2 and three 1/2, chosen by a reproducible rule.

    QuIP# hand-picks 29 of them; here they are picked greedily to be spread out: start from
    the lexicographically first, then repeatedly add the candidate farthest (in minimum
    distance) from those already chosen, ties broken by lexicographic order.
    """
    cands = []
    for ones in itertools.combinations(range(DIM), 3):
        row = [3.0] * DIM
        for i in ones:
            row[i] = 1.0
        cands.append(row)
    pool = torch.tensor(sorted(cands), dtype=torch.float64) / 2
    chosen = [0]
    mind = torch.cdist(pool, pool[:1]).squeeze(1)
    while len(chosen) < 29:
        mind[chosen] = -1.0
        best = int(torch.argmax(mind))  # argmax returns the first maximum: the lexicographic tie-break
        chosen.append(best)
        mind = torch.minimum(mind, torch.cdist(pool, pool[best : best + 1]).squeeze(1))
    return pool[sorted(chosen)]


@cache
def e8p_abs_patterns() -> torch.Tensor:
    """(256, 8) float64: the absolute patterns, coordinate 7 negated where that makes the sum even.

    Storing one coordinate's sign in the pattern means that "even number of sign flips"
    keeps every decoded vector in E8, whatever the pattern.
    """
    # Every |x| pattern of half-integers has a sign choice with even sum (one flip changes the
    # parity), so the distinct |x| of D8 + 1/2 within the ball are the positive patterns in it.
    half = torch.arange(4, dtype=torch.float64) + 0.5
    grid = torch.cartesian_prod(*[half] * DIM)
    small = grid[(grid * grid).sum(1) <= 10]  # cartesian_prod is lexicographic: 227 sorted rows
    pats = torch.cat([small, _norm12_patterns()])
    odd = pats.sum(1).remainder(2) == 1
    pats[odd, DIM - 1] *= -1
    return pats


def e8p_decode(codes: torch.Tensor) -> torch.Tensor:
    """(...,) integer codes in [0, 2^16) -> (..., 8) float64 codebook vectors."""
    codes = codes.long() & 0xFFFF
    pats = e8p_abs_patterns().to(codes.device)
    a = pats[codes & 0xFF]
    bit = torch.arange(1, DIM, device=codes.device)
    flips = (codes.unsqueeze(-1) >> (bit + 7)) & 1  # sign bits of coordinates 1..7
    signs = torch.ones_like(a)
    signs[..., 1:] = 1.0 - 2.0 * flips.to(a.dtype)
    # Coordinate 0's sign: whichever makes the coordinate sum even (the vector in E8).
    total = (signs * a).sum(-1)
    odd = total.remainder(2) != 0
    signs[..., 0] = torch.where(odd, -1.0, 1.0)
    shift = torch.where(((codes >> 15) & 1).bool(), -0.25, 0.25).to(a.dtype)
    return signs * a + shift.unsqueeze(-1)


@cache
def e8p_grid() -> torch.Tensor:
    """(65536, 8) float64: every E8P entry, row = code."""
    return e8p_decode(torch.arange(E8P_CODES))


def _best_signed(y: torch.Tensor, pats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row of ``y`` (N, 8) and each pattern (P, 8): the distance^2 to the nearest
    ``s * a`` with even coordinate sum, and the signs achieving it.

    Returns (dist2 (N, P), sign_of_y (N, 8), flip_index (N, P) or -1 when no flip is needed).
    """
    sgn = torch.where(y < 0, -1.0, 1.0).to(y.dtype)
    ya = y.abs()
    # Patterns carry coordinate 7's sign; compare against |pattern| and fold its sign into s.
    pabs = pats.abs()
    ip = ya @ pabs.T
    dist2 = (ya * ya).sum(1, keepdim=True) - 2 * ip + (pabs * pabs).sum(1)
    # Sum of sign(y) * |a|: its parity says whether the signs of y give an E8 point.
    total = sgn @ pabs.T
    odd = total.remainder(2) != 0
    cost = ya.unsqueeze(1) * pabs.unsqueeze(0)  # (N, P, 8): flipping i adds 4 |y_i| a_i
    low, idx = cost.min(-1)
    dist2 = dist2 + torch.where(odd, 4 * low, torch.zeros_like(low))
    return dist2, sgn, torch.where(odd, idx, torch.full_like(idx, -1))


def e8p_encode(x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(N, 8) -> (N,) int64 code of the nearest E8P entry (exact; ties to the lower shift)."""
    x = x.to(torch.float64).reshape(-1, DIM)
    pats = e8p_abs_patterns().to(x.device)
    pat_sign7 = torch.where(pats[:, DIM - 1] < 0, -1.0, 1.0).to(x.dtype)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk]
        best_d = best_code = None
        for shift_bit, shift in ((0, 0.25), (1, -0.25)):
            y = xb - shift
            dist2, sgn, flip = _best_signed(y, pats)
            d, p = dist2.min(1)
            f = flip.gather(1, p.unsqueeze(1)).squeeze(1)
            s = sgn.clone()
            rows = torch.nonzero(f >= 0).squeeze(1)
            s[rows, f[rows]] *= -1
            # The decoder multiplies |a| by signs, except coordinate 7 where the pattern holds a sign.
            s[:, DIM - 1] *= pat_sign7[p]
            flips = (s[:, 1:] < 0).long()
            code = p | (flips << torch.arange(8, 15, device=x.device)).sum(1) | (shift_bit << 15)
            if best_d is None or best_code is None:
                best_d, best_code = d, code
            else:
                better = d < best_d
                best_d = torch.where(better, d, best_d)
                best_code = torch.where(better, code, best_code)
        assert best_code is not None
        out[start : start + chunk] = best_code
    return out


@cache
def e8_1bit_grid() -> torch.Tensor:
    """(256, 8) float64: a 1-bit/weight E8 codebook for residuals.

    The 241 E8 points of norm^2 <= 2 (the origin and the 240 roots) and 15 of the 16 points
    ``+-2 e_i`` (norm^2 4; ``-2 e_7`` left out to fit the byte): small residuals round to
    the origin or a root.
    """
    ints = torch.arange(-2, 3, dtype=torch.float64)
    halves = torch.tensor([-0.5, 0.5], dtype=torch.float64)
    pts = torch.cat([torch.cartesian_prod(*[ints] * DIM), torch.cartesian_prod(*[halves] * DIM)])
    keep = (pts.sum(1).remainder(2) == 0) & ((pts * pts).sum(1) <= 2)
    axes = torch.cat([2 * torch.eye(DIM, dtype=torch.float64), -2 * torch.eye(DIM, dtype=torch.float64)[: DIM - 1]])
    return torch.cat([pts[keep], axes])


def e8_1bit_encode(x: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """(N, 8) -> (N,) int64 index of the nearest :func:`e8_1bit_grid` entry (brute force over 256)."""
    x = x.to(torch.float64).reshape(-1, DIM)
    grid = e8_1bit_grid().to(x.device)
    gn = (grid * grid).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk]
        out[start : start + chunk] = (gn - 2 * xb @ grid.T).argmin(1)
    return out
