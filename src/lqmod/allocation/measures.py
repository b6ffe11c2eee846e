"""The error measures of an error table, and checking that the statistics can feed them.

What each measure is: :mod:`lqmod.allocation.table` (whose ``error=`` picks one).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lqmod.types import LayerStats

# Rows of at most this many elements are reduced at a time: float64 temporaries stay small.
_CHUNK = 1 << 22
ERROR_MEASURES = ("auto", "frobenius", "fisher", "output", "kfac")
# The statistics each measure reads (the table's `weighting` names the measure it used).
_NEEDS: dict[str, tuple[str, ...]] = {"fisher": ("fisher",), "output": ("hessian",), "kfac": ("fisher", "hessian")}
_HINTS = {
    "fisher": "give a diagonal Fisher for every target matrix or for none (lqmod.calibration.diagonal_fisher)",
    "hessian": "compute Hessians for every target (lqmod.calibration.collect_hessians)",
}


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, fisher: torch.Tensor | None = None) -> float:
    """``sum((W - Q)^2)`` or ``sum(F * (W - Q)^2)``, accumulated in float64 a block of rows at a time."""
    rows = max(1, _CHUNK // max(1, weight.shape[1]))
    total = 0.0
    for start in range(0, weight.shape[0], rows):
        d = weight[start : start + rows].double() - approx[start : start + rows].double()
        sq = d * d
        if fisher is not None:
            sq = sq * fisher[start : start + rows].double()
        total += float(sq.sum())
    return total


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor, n_tokens: int) -> float:
    """``tr((W - Q) H (W - Q)^T) / n_tokens`` in float64, a block of rows at a time.

    ``hessian`` is ``sum x x^T`` (in, in) over ``n_tokens`` inputs, so the result is the mean
    squared output error ``||(W - Q) x||^2`` over those inputs (``n_tokens`` <= 0: the plain sum).
    """
    h = hessian.double()
    rows = max(1, _CHUNK // max(1, weight.shape[1]))
    total = 0.0
    for start in range(0, weight.shape[0], rows):
        d = weight[start : start + rows].double() - approx[start : start + rows].double()
        total += float(((d @ h) * d).sum())
    # H is positive semi-definite, so a (tiny) negative total is float64 rounding of a zero error.
    total = max(total, 0.0)
    return total / n_tokens if n_tokens > 0 else total


def kfac_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor) -> float:
    """``sum_i G_i (dW H dW^T)_ii / n`` with ``G_i = n sum_j F_ij / tr(H)``, in float64.

    ``fisher`` is the (out, in) diagonal Fisher, ``hessian`` the (in, in) ``sum x x^T``.
    Returns 0 for a layer whose inputs were all zero (``tr(H) = 0``: no output error either).
    """
    # Where G_i comes from. lqmod.calibration.diagonal_fisher returns the mean over E examples
    # of the squared per-example gradient, F_ij = (1/E) sum_e (sum_{t in e} g_ti x_tj)^2, with
    # g_t = dL_e/dy_t the output gradient at token t (the example's tokens are summed inside the
    # square). collect_hessians returns H = sum_t x_t x_t^T, a *sum* over its n tokens. K-FAC
    # drops the cross-token terms and takes g independent of x, so with T = (tokens in F's
    # examples) / E the full Fisher is F_full ~ T E_t[x x^T] (x) E_t[g g^T] = A (x) S and its
    # diagonal F_ij ~ T S_ii A_jj; summing over j, sum_j F_ij ~ T S_ii tr(A). A is estimated
    # from H as H / n, so G_i := T S_ii = sum_j F_ij / (tr(H) / n): dividing by tr(H) / n, the
    # mean ||x||^2 per token, is what makes F's per-example mean and H's token sum consistent.
    # The loss change vec(dW)^T (A (x) diag(G)) vec(dW) = sum_i G_i (dW A dW^T)_ii then is
    # sum_i (sum_j F_ij) (dW H dW^T)_ii / tr(H): n cancels, and so does any rescaling of H (a
    # sink weighting included). It is in the units of the per-example loss that F was taken of.
    h = hessian.double()
    trace = float(h.diagonal().sum())
    if trace <= 0.0:
        return 0.0
    rows = max(1, _CHUNK // max(1, weight.shape[1]))
    total = 0.0
    for start in range(0, weight.shape[0], rows):
        d = weight[start : start + rows].double() - approx[start : start + rows].double()
        per_output = ((d @ h) * d).sum(1)  # (dW H dW^T)_ii, >= 0 up to rounding
        g = fisher[start : start + rows].double().sum(1)
        total += float((g * per_output.clamp(min=0.0)).sum())
    return total / trace


def _missing_fields(error: str, stats: LayerStats | None) -> list[str]:
    return [f for f in _NEEDS.get(error, ()) if stats is None or getattr(stats, f) is None]


def resolve_error_measure(error: str, names: list[str], stats: Mapping[str, LayerStats] | None) -> str:
    """The measure ``error`` stands for (``"auto"`` resolved); raises if a matrix lacks its statistic."""
    if error not in ERROR_MEASURES:
        raise ValueError(f"unknown error measure {error!r}; accepted: {', '.join(ERROR_MEASURES)}")
    if error == "auto":
        has_fisher = bool(stats) and any(s is not None and s.fisher is not None for s in (stats or {}).values())
        error = "fisher" if has_fisher else "frobenius"
    for field_name in _NEEDS.get(error, ()):
        have = [n for n in names if stats and stats.get(n) is not None and getattr(stats[n], field_name) is not None]
        missing = [n for n in names if n not in have]
        if missing:
            raise ValueError(
                f"error measure {error!r} needs stats.{' and stats.'.join(_NEEDS[error])} for every matrix; "
                f"stats.{field_name} given for {len(have)} of {len(names)} (missing e.g. {missing[:3]}): "
                f"{_HINTS[field_name]}, or use a measure the statistics allow ({_allowed(names, stats)})"
            )
    return error


def _allowed(names: list[str], stats: Mapping[str, LayerStats] | None) -> str:
    """The measures the statistics can feed for every one of ``names``, for error messages."""
    ok = [m for m in ERROR_MEASURES[1:] if all(not _missing_fields(m, (stats or {}).get(n)) for n in names)]
    return ", ".join(ok)


def _weighting(names: list[str], stats: Mapping[str, LayerStats] | None, error: str = "auto") -> str:
    return resolve_error_measure(error, names, stats)


def _measures_for(weighting: str, stats: LayerStats | None, shape: tuple[int, int]) -> list[str]:
    """``weighting`` first, then every other measure ``stats`` can feed for an (out, in) matrix."""
    out = [weighting]
    extra = ["frobenius"]
    has_h = stats is not None and stats.hessian is not None and tuple(stats.hessian.shape) == (shape[1], shape[1])
    has_f = stats is not None and stats.fisher is not None and tuple(stats.fisher.shape) == shape
    if has_h:
        extra.append("output")
    if has_f:
        extra.append("fisher")
    if has_h and has_f:
        extra.append("kfac")
    return out + [m for m in extra if m != weighting]


def _check_stats(name: str, weight: torch.Tensor, stats: LayerStats | None, weighting: str) -> None:
    """The statistics ``weighting`` reads are present and shaped for this (out, in) weight."""
    missing = _missing_fields(weighting, stats)
    if missing:
        what = {"fisher": "stats.fisher (diagonal Fisher)", "hessian": "stats.hessian (sum of x x^T)"}
        raise ValueError(
            f"{name}: error measure {weighting!r} needs {' and '.join(what[f] for f in _NEEDS[weighting])} for "
            f"every matrix; this one lacks {', '.join(what[f] for f in missing)}: give it for every matrix, or "
            f"use a measure its statistics allow ({_allowed([name], {name: stats} if stats else None)})"
        )
    fields_read = _NEEDS.get(weighting, ())
    if stats is None or not fields_read:
        return
    if "fisher" in fields_read and stats.fisher is not None and tuple(stats.fisher.shape) != tuple(weight.shape):
        raise ValueError(
            f"{name}: Fisher shape {tuple(stats.fisher.shape)} differs from the (out, in) weight shape "
            f"{tuple(weight.shape)}"
        )
    square = (weight.shape[1], weight.shape[1])
    if "hessian" in fields_read and stats.hessian is not None and tuple(stats.hessian.shape) != square:
        raise ValueError(
            f"{name}: Hessian shape {tuple(stats.hessian.shape)} is not (in, in) = {square} for the (out, in) "
            f"weight {tuple(weight.shape)}"
        )
