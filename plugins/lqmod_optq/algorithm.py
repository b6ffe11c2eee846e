"""The OPTQ / GPTQ column sweep (Frantar et al. 2022), free of storage concerns.

For a weight ``W`` (out, in) and the input second moment ``H = E[x x^T]`` (in, in), OPTQ
rounds ``W`` column by column to minimise ``tr((W - Q) H (W - Q)^T)``: after rounding
column ``j`` the rounding error, divided by ``U[j, j]``, is pushed onto the columns not yet
rounded through row ``j`` of ``U``, the upper Cholesky factor of ``H^-1`` (the "Cholesky
reformulation": row ``j`` of ``U`` scaled by ``1/U[j, j]`` is the optimal update once columns
``< j`` are fixed). Updates are applied lazily: inside a block of ``block_size`` columns
eagerly, to the rest of the matrix once per block with one matrix product.

Group fitting (``group_fit``): when a group starts inside a lazy block, the reference
implementation (IST-DASLab/gptq, GPTQModel) fits its scale and zero point on the global copy
of the weights, which has the updates of earlier *blocks* but not the pending ones of the
current block. ``"reference"`` (the default) does the same. ``"updated"`` fits on the fully
error-updated weights instead, so the result is the unblocked algorithm's whatever
``block_size`` is; it is the cleaner definition but measured worse (0.3-8% higher proxy loss
on groups smaller than the block, and 0.4-1.5% higher layer output error than GPTQModel on
MiniLM at group 64), plausibly because the pending updates of a few columns are a noisy
estimate of the final ones. Both agree when groups start on block boundaries.

Other differences from the reference implementation, both deliberate:

* scales are rounded to float16 *before* they are used, so the error feedback sees exactly the
  weight that will be stored and materialized;
* a failed Cholesky is retried with 10x, 100x, 1000x the damping (reported in ``meta``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lqmod.quantize import QuantizationError
from lqmod_optq import scale_codes

__all__ = ["OPTQResult", "fit_grid", "inverse_cholesky", "normalised_hessian", "optq"]

DAMP_RETRIES = 3  # damp x 10, x 100, x 1000 before giving up


@dataclass
class OPTQResult:
    """Codes in the original column order, per-group float16 scales and integer zero points.

    ``g_idx[i]`` is the group of input column ``i``; groups are numbered in the order the sweep
    reached them (act-order permutes them), exactly as GPTQ checkpoints number them.
    """

    codes: torch.Tensor  # (out, in) int64 in [0, 2**bits)
    scales: torch.Tensor  # (out, n_groups) float16
    zeros: torch.Tensor  # (out, n_groups) int64 in [0, 2**bits)
    g_idx: torch.Tensor  # (in,) int64
    perm: torch.Tensor | None  # the sweep order when act-order was used
    meta: dict[str, Any] = field(default_factory=dict)


def normalised_hessian(hessian: torch.Tensor | None, n_tokens: int, in_features: int) -> torch.Tensor:
    """``sum x x^T / n_tokens`` in float64, symmetrised; clear errors for what cannot be used."""
    if hessian is None:
        raise QuantizationError("optq needs calibration statistics: stats.hessian (sum of x x^T) is missing")
    if hessian.dim() != 2 or tuple(hessian.shape) != (in_features, in_features):
        raise QuantizationError(
            f"stats.hessian has shape {tuple(hessian.shape)}; optq needs (in_features, in_features) = "
            f"({in_features}, {in_features})"
        )
    h = hessian.detach().to(torch.float64)
    if not bool(torch.isfinite(h).all()):
        raise QuantizationError("stats.hessian holds non-finite values (NaN or Inf): recompute the statistics")
    if n_tokens > 0:
        h = h / n_tokens
    # Accumulated in pieces, X^T X can be asymmetric by rounding; the Cholesky reads one triangle.
    return (h + h.T) / 2


def inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, with more damping if needed.

    Returns the factor (float64), the damping fraction used and how many retries it took.
    """
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    tried = []
    for attempt in range(DAMP_RETRIES + 1):
        used = damp * 10.0**attempt
        tried.append(used)
        chol, info = torch.linalg.cholesky_ex(h + (used * mean_diag) * eye)
        if int(info) != 0:
            continue
        inv = torch.cholesky_inverse(chol)
        upper, info = torch.linalg.cholesky_ex(inv, upper=True)
        if int(info) == 0 and bool(torch.isfinite(upper).all()):
            return upper, used, attempt
    raise QuantizationError(
        f"the damped Hessian is not positive definite even with damping fractions {tried} of its mean "
        f"diagonal {mean_diag:.4g}: the calibration statistics are degenerate; collect more tokens or raise damp"
    )


def fit_grid(
    x: torch.Tensor, bits: int, sym: bool, scale_ref: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min-max grid of each row of ``x``: (float16 scale, zero point in x's dtype).

    The range is widened to include 0 (so 0 is on the grid); a symmetric grid uses
    ``absmax`` on both sides and the fixed zero point ``2**(bits-1)``; an all-zero row gets
    the range [-1, 1] as in GPTQ (its weights still round to exactly 0). With ``scale_ref``
    the scale is the nearest level of the byte grid below it (:mod:`lqmod_optq.scale_codes`).
    """
    maxq = 2**bits - 1
    zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(dim=1), zero)
    xmax = torch.maximum(x.amax(dim=1), zero)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16)
    if scale_ref is not None:
        raw = (xmax - xmin) / maxq
        scale = scale_codes.table(scale_ref, x.device)[scale_codes.encode(raw, scale_ref).long()]
    if not bool(torch.isfinite(scale).all()):
        raise QuantizationError(
            f"a group's scale {float(((xmax - xmin) / maxq).max()):.4g} overflows float16, the storage type of "
            "GPTQ scales; the weights are too large for this format"
        )
    if sym:
        zp = torch.full_like(xmin, 2 ** (bits - 1))
    else:
        zp = torch.clamp(torch.round(-xmin / _safe(scale.to(x.dtype))), 0, maxq)
    return scale, zp


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # A float16 scale that underflowed to 0 would divide by zero; its weights become exactly
    # 0 after materialization anyway (code * 0), so any finite divisor will do.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def optq(
    weight: torch.Tensor,
    h: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    desc_act: bool = False,
    static_groups: bool = False,
    sym: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    group_fit: str = "reference",
    scale_ref: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> OPTQResult:
    """Quantize ``weight`` (out, in) against the normalised Hessian ``h`` (in, in, float64).

    ``group_size`` must divide ``in`` (pass ``in`` for one group per row). ``dtype`` is the
    arithmetic of the sweep: float32 for use, float64 to compare with a reference.
    ``scale_ref``: take every scale from the byte grid below it (``scale_bits=8``).
    """
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise QuantizationError(f"group_size={group_size} does not divide in_features={in_f}")
    if group_fit not in ("reference", "updated"):
        raise QuantizationError(f"group_fit must be 'reference' or 'updated', got {group_fit!r}")
    maxq = 2**bits - 1
    n_groups = in_f // group_size
    h = h.clone()
    w_all = weight.to(dtype).clone()

    # Dead inputs (never non-zero in calibration) carry no information: GPTQ zeroes their
    # weights and gives them a unit diagonal so the factorisation exists.
    dead = h.diagonal() == 0
    n_dead = int(dead.sum())
    if n_dead:
        h[dead, dead] = 1.0
        w_all[:, dead] = 0.0

    scales = torch.empty(out_f, n_groups, dtype=torch.float16, device=weight.device)
    zeros = torch.empty(out_f, n_groups, dtype=dtype, device=weight.device)
    if static_groups:
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = fit_grid(w_all[:, g * group_size : (g + 1) * group_size], bits, sym, scale_ref)

    perm: torch.Tensor | None = None
    col_group = torch.arange(in_f, device=weight.device) // group_size  # by sweep position
    if desc_act:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w_all = w_all[:, perm]
        h = h[perm][:, perm]
        if static_groups:
            col_group = perm // group_size

    upper64, damp_used, retries = inverse_cholesky(h, damp)
    u = upper64.to(dtype)
    del upper64, h

    codes = torch.empty(out_f, in_f, dtype=torch.int64, device=weight.device)
    col_group_list = col_group.tolist()
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w_all[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static_groups and j % group_size == 0:
                g = j // group_size
                current = (
                    _group_now(w_all, w1, err1, u, i1, i2, i, group_size)
                    if group_fit == "updated"
                    else w_all[:, j : j + group_size]
                )
                scales[:, g], zeros[:, g] = fit_grid(current, bits, sym, scale_ref)
            g = col_group_list[j]
            s = scales[:, g].to(dtype)
            z = zeros[:, g]
            col = w1[:, i]
            q = torch.clamp(torch.round(col / _safe(s)) + z, 0, maxq)
            codes[:, j] = q.to(torch.int64)
            e = (col - (q - z) * s) / u1[i, i]
            w1[:, i + 1 :] -= e.unsqueeze(1) * u1[i, i + 1 :].unsqueeze(0)
            err1[:, i] = e
        if i2 < in_f:
            w_all[:, i2:] -= err1 @ u[i1:i2, i2:]

    g_idx = col_group
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        g_idx = col_group[inv]
    meta: dict[str, Any] = {"damp_used": damp_used, "damp_retries": retries, "dead_columns": n_dead}
    return OPTQResult(codes, scales, zeros.to(torch.int64), g_idx.to(torch.int64), perm, meta)


def _group_now(
    w_all: torch.Tensor,
    w1: torch.Tensor,
    err1: torch.Tensor,
    u: torch.Tensor,
    i1: int,
    i2: int,
    i: int,
    group_size: int,
) -> torch.Tensor:
    """The group starting at sweep position ``i1 + i``, with every error update applied so far.

    Columns inside the block are current in ``w1``; those past the block still lack the
    block's pending (lazy) updates from its first ``i`` columns, which are applied here.
    """
    j, end = i1 + i, i1 + i + group_size
    inside = w1[:, i : min(end, i2) - i1]
    if end <= i2:
        return inside
    outside = w_all[:, i2:end]
    if i > 0:
        outside = outside - err1[:, :i] @ u[i1:j, i2:end]
    return torch.cat([inside, outside], dim=1)
