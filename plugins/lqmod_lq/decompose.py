"""The LQ decomposition ``W ~ Q + L1 L2`` over any quantizer (LQ-LoRA, Guo et al. 2023, section 3.1).

Alternating minimisation, starting from Q = 0:

1. ``L1, L2 <- best rank-r fit of (W - Q)`` (randomized SVD, optionally Fisher-weighted);
2. ``Q <- quantize(W - L1 L2)`` with the base quantizer, whatever it is.

Step 1 is optimal for fixed Q and step 2 is (approximately) optimal for fixed L, but the
quantizer is not a projection, so the objective can rise: the loop stops at the first
iterate that does not improve on the best one by a relative ``tol`` and returns the best
iterate seen (LQ-LoRA returns the last one, which can be the worse one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lqmod.types import Materialize, QuantizedWeight
from lqmod_lq.factors import decode, encode
from lqmod_lq.lowrank import fisher_scales, lowrank_factors

__all__ = ["Decomposition", "decompose", "weighted_error"]


@dataclass
class Decomposition:
    """The kept (best) iterate: the base's quantized weight and the factors, plus the history.

    ``l1`` and ``l2`` are float32 holding exactly what the factor storage (``factors``, see
    :mod:`lqmod_lq.factors`) gives back from ``stored``, so ``materialize(qweight) + l1 @ l2`` is
    what the stored tensors will materialize to.
    ``errors[i]`` is the objective after iteration ``i``; ``best`` indexes the kept one.
    """

    qweight: QuantizedWeight
    l1: torch.Tensor
    l2: torch.Tensor
    stored: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: list[float] = field(default_factory=list)
    best: int = 0

    @property
    def error(self) -> float:
        return self.errors[self.best]


def weighted_error(residual: torch.Tensor, fisher: torch.Tensor | None) -> float:
    """``||residual||_F``, or ``||sqrt(F) * residual||_F`` with a Fisher estimate (float64)."""
    r = residual.double()
    if fisher is not None:
        r = r * fisher.double().to(r.device).sqrt()
    return float(r.norm())


def decompose(
    weight: torch.Tensor,
    rank: int,
    quantize: Callable[[torch.Tensor], QuantizedWeight],
    materialize: Materialize,
    *,
    fisher: torch.Tensor | None = None,
    max_iters: int = 20,
    tol: float = 1e-4,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    factors: str = "fp32",
) -> Decomposition:
    """Decompose ``weight`` (out, in) into a quantized part and rank-``rank`` factors.

    ``quantize(residual)`` must return the base quantizer's weight for a float32 residual and
    ``materialize`` be that quantizer's. With ``fisher`` (shaped like the weight) the SVD is
    weighted by its rank-1 row/column approximation (:func:`~lqmod_lq.lowrank.fisher_scales`)
    and the stopping rule and the kept iterate use the exact weighted error
    ``||sqrt(F) * (W - Q - L1 L2)||_F``.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters={max_iters} must be >= 1")
    w = weight.detach().float()
    shape = (w.shape[0], w.shape[1])
    row_scale = col_scale = None
    if fisher is not None:
        row_scale, col_scale = fisher_scales(fisher, shape)
        row_scale, col_scale = row_scale.float().to(w.device), col_scale.float().to(w.device)
    generator = torch.Generator().manual_seed(seed)

    q_dense = torch.zeros_like(w)
    kept: Decomposition | None = None
    errors: list[float] = []
    for it in range(max_iters):
        l1, l2 = lowrank_factors(
            w - q_dense, rank, row_scale=row_scale, col_scale=col_scale,
            oversample=oversample, power_iters=power_iters, generator=generator,
        )  # fmt: skip
        # Round to the storage format *before* quantizing the rest, so Q absorbs the rounding.
        stored = encode(l1, l2, factors)
        l1, l2 = decode(stored, factors)
        low = l1 @ l2
        qweight = quantize(w - low)
        q_dense = materialize(qweight, torch.float32).to(w.device)
        err = weighted_error(w - q_dense - low, fisher)
        errors.append(err)
        if kept is None or err < kept.error:
            improvement = 1.0 if kept is None else (kept.error - err) / max(kept.error, 1e-300)
            kept = Decomposition(qweight, l1, l2, stored, errors, it)
            if it > 0 and improvement < tol:
                break
        else:
            break
    assert kept is not None
    kept.errors = errors
    return kept
