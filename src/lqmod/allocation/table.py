"""The error table: for every target matrix and every option, its error and exact storage bits.

Built matrix by matrix (a progress bar per matrix), each option's result written to the
:class:`~lqmod.allocation.cache.TableCache` as soon as it is known. The error measure
(``error=``) is one of

* ``"frobenius"``: ``||W - Q||_F^2`` (weight space);
* ``"fisher"``: ``sum(F * (W - Q)^2)`` with the diagonal Fisher ``F = LayerStats.fisher``;
* ``"output"``: the calibrated output error ``tr((W - Q) H (W - Q)^T) / n`` with ``H =
  LayerStats.hessian`` (``sum x x^T`` over ``n = LayerStats.n_tokens`` calibration tokens), i.e.
  the mean over calibration tokens of ``||(W - Q) x||^2``: what OPTQ and QuIP# minimise, and
  summed over matrices the quantity a plan trades off;
* ``"kfac"``: the second-order loss change ``vec(dW)^T F vec(dW)`` with the weight Fisher ``F``
  in its K-FAC form (output gradients independent of inputs, and of other tokens'):
  ``F ~ A (x) diag(G)`` with ``A = H / n``, i.e. ``sum_i G_i (dW H dW^T)_ii / n``, where ``G_i``,
  the mean squared loss gradient at output ``i`` (per example, tokens summed), is read off the
  diagonal Fisher: ``G_i = n * sum_j F_ij / tr(H)`` (derivation at :func:`kfac_error`). Each
  layer's output error is weighted by how much the loss cares about it, so the terms of
  different layers are in one unit (loss) and their sum is what a plan should trade off,
  where ``"output"`` weights layers by their activation scale. Needs ``fisher`` and ``hessian``;
* ``"auto"`` (the default): ``"fisher"`` when the statistics hold Fishers, else ``"frobenius"``.

Every matrix must carry the statistic its measure reads. Sums run in float64.

Quantizing is what costs (seconds per matrix for OPTQ or QuIP#); measuring is cheap. So each
quantization is measured with *every* measure its matrix's statistics allow, and each result is
cached under its own measure: a table built with another measure over the same statistics
(``--error frobenius`` after ``--error output``) quantizes nothing again.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lqmod.allocation.cache import TableCache, stats_hash, tensor_hash
from lqmod.allocation.options import collect_options, option_key
from lqmod.config import TargetConfig, validate_config
from lqmod.model import _dense_weight, find_targets
from lqmod.plugins import Registry, get_registry
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.types import AllocationProblem, Candidate, LayerStats, Option, QuantizerSpec

__all__ = [
    "ERROR_MEASURES",
    "ErrorTable",
    "MatrixInfo",
    "build_error_table",
    "build_model_error_table",
    "kfac_error",
    "output_error",
    "resolve_error_measure",
    "weighted_error",
]

CacheArg = TableCache | str | os.PathLike[str] | bool | None
# Rows of at most this many elements are reduced at a time: float64 temporaries stay small.
_CHUNK = 1 << 22
ERROR_MEASURES = ("auto", "frobenius", "fisher", "output", "kfac")
# The statistics each measure reads (the table's `weighting` names the measure it used).
_NEEDS: dict[str, tuple[str, ...]] = {"fisher": ("fisher",), "output": ("hessian",), "kfac": ("fisher", "hessian")}
_HINTS = {
    "fisher": "give a diagonal Fisher for every target matrix or for none (lqmod.calibration.diagonal_fisher)",
    "hessian": "compute Hessians for every target (lqmod.calibration.collect_hessians)",
}


@dataclass(frozen=True)
class MatrixInfo:
    name: str
    shape: tuple[int, int]
    weight_hash: str

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class ErrorTable:
    """Candidates per matrix, plus what was skipped and why.

    ``candidates[name]`` lists, in ``options`` order, every option valid for that matrix;
    ``skipped[name]`` lists ``(option label, reason)`` for the others.
    """

    options: list[Option]
    weighting: str
    matrices: dict[str, MatrixInfo] = field(default_factory=dict)
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    computed: int = 0  # options quantized in this build
    cached: int = 0  # options read from the cache

    @property
    def n_params(self) -> int:
        return sum(m.numel for m in self.matrices.values())

    def problem(self, budget_bits: int) -> AllocationProblem:
        return AllocationProblem(
            candidates={n: tuple(rows) for n, rows in self.candidates.items()},
            budget_bits=int(budget_bits),
            numel={n: m.numel for n, m in self.matrices.items()},
        )

    def uniform(self) -> dict[str, tuple[float, int]]:
        """Option label -> (total error, total bits) for every option valid on every matrix."""
        totals: dict[str, tuple[float, int]] = {}
        for opt in self.options:
            rows = [next((c for c in self.candidates[n] if c.option == opt), None) for n in self.matrices]
            if all(r is not None for r in rows):
                present = [r for r in rows if r is not None]
                totals[opt.label] = (math.fsum(r.error for r in present), sum(r.bits for r in present))
        return totals

    def skip_reasons(self) -> dict[str, dict[str, int]]:
        """Option label -> {reason: number of matrices}, for the summary."""
        out: dict[str, dict[str, int]] = {}
        for rows in self.skipped.values():
            for label, reason in rows:
                out.setdefault(label, {})
                out[label][reason] = out[label].get(reason, 0) + 1
        return out


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


def _measure(
    spec: QuantizerSpec,
    option: Option,
    weight: torch.Tensor,
    stats: LayerStats | None,
    measures: list[str],
    name: str,
) -> dict[str, dict[str, Any]]:
    """Quantize one matrix with one option once: a record (error, exact bits) or a skip reason per measure."""
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    numel = shape[0] * shape[1]
    try:
        predicted = spec.bits_per_param(option.config, shape)
        qw = quantize_weight(spec, weight, option.config, stats, name=name)
    except QuantizationError as exc:
        return {m: {"label": option.label, "skipped": f"QuantizationError: {exc}"} for m in measures}
    bits = qw.storage_bits()
    if predicted * numel != bits and abs(predicted * numel - bits) > 1e-9 * bits:
        warnings.warn(
            f"{name}: {option.label}: bits_per_param predicts {predicted * numel:.1f} bits but the quantized "
            f"weight stores {bits}; the table uses the stored size (a plug-in bug in bits_per_param)",
            RuntimeWarning,
            stacklevel=3,
        )
    with torch.no_grad():
        approx = spec.materialize(qw, torch.float32)
    out: dict[str, dict[str, Any]] = {}
    for measure in measures:
        if measure == "output":
            assert stats is not None and stats.hessian is not None  # _measures_for checked it
            error = output_error(weight, approx, stats.hessian, stats.n_tokens)
        elif measure == "kfac":
            assert stats is not None and stats.hessian is not None and stats.fisher is not None
            error = kfac_error(weight, approx, stats.hessian, stats.fisher)
        else:
            error = weighted_error(weight, approx, stats.fisher if measure == "fisher" and stats is not None else None)
        if math.isfinite(error):
            out[measure] = {"label": option.label, "error": error, "bits": int(bits)}
        else:
            out[measure] = {"label": option.label, "skipped": f"non-finite error {error!r}"}
    return out


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


def _resolve_cache(cache: CacheArg) -> TableCache | None:
    if cache is False:
        return None
    if cache is None or cache is True:
        return TableCache()
    if isinstance(cache, TableCache):
        return cache
    return TableCache(cache)


def build_error_table(
    weights: Iterable[tuple[str, torch.Tensor]],
    options: list[Option],
    *,
    stats: Mapping[str, LayerStats] | None = None,
    cache: CacheArg = None,
    registry: Registry | None = None,
    progress: bool = True,
    total: int | None = None,
    error: str = "auto",
) -> ErrorTable:
    """Error table of named (out, in) weights, streamed: one weight is held at a time.

    ``weights`` may be a generator; ``total`` sizes the progress bar. ``cache``: a
    :class:`TableCache`, a directory, None/True for the default root, False for none.
    ``error``: the measure (module docstring); each matrix must have the statistic it reads.
    """
    registry = registry or get_registry()
    specs = {o.quantizer: registry.quantizer(o.quantizer) for o in options}
    keys = [option_key(o, registry) for o in options]
    store = _resolve_cache(cache)
    if error not in ERROR_MEASURES:
        raise ValueError(f"unknown error measure {error!r}; accepted: {', '.join(ERROR_MEASURES)}")
    # A weighting is all-or-none: each matrix is checked as it streams past.
    weighting = resolve_error_measure(error, [], stats)
    table = ErrorTable(options=list(options), weighting=weighting)
    bar = tqdm(weights, total=total, desc="error table", unit="matrix", disable=not progress)
    for name, weight in bar:
        if weight.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        layer_stats = stats.get(name) if stats else None
        _check_stats(name, weight, layer_stats, weighting)
        info = MatrixInfo(name, (int(weight.shape[0]), int(weight.shape[1])), tensor_hash(weight))
        table.matrices[name] = info
        s_key = stats_hash(layer_stats)
        measures = _measures_for(weighting, layer_stats, info.shape)
        records = store.load(info.weight_hash, s_key, weighting) if store is not None else {}
        others: dict[str, dict[str, dict[str, Any]]] | None = None  # the other measures' records, read once
        rows: list[Candidate] = []
        skipped: list[tuple[str, str]] = []
        for option, key in zip(options, keys, strict=True):
            spec = specs[option.quantizer]
            missing = [s for s in sorted(spec.needs) if layer_stats is None or getattr(layer_stats, s, None) is None]
            if missing:
                skipped.append((option.label, f"needs calibration statistics {missing}, not supplied"))
                continue
            record = records.get(key)
            if record is None:
                by_measure = _measure(spec, option, weight, layer_stats, measures, name)
                record = by_measure[weighting]
                table.computed += 1
                if store is not None:
                    if others is None:
                        others = {m: store.load(info.weight_hash, s_key, m) for m in measures[1:]}
                    records[key] = record
                    store.save(info.weight_hash, s_key, weighting, records)
                    for m, rec in others.items():
                        rec[key] = by_measure[m]
                        store.save(info.weight_hash, s_key, m, rec)
            else:
                table.cached += 1
            if "skipped" in record:
                skipped.append((option.label, str(record["skipped"])))
            else:
                rows.append(Candidate(option, float(record["error"]), int(record["bits"])))
        table.candidates[name] = rows
        table.skipped[name] = skipped
        bar.set_postfix(computed=table.computed, cached=table.cached)
    return table


def build_model_error_table(
    model: nn.Module,
    *,
    quantizers: Iterable[str] | None = None,
    options: list[Option] | None = None,
    targets: TargetConfig | Mapping[str, Any] | None = None,
    stats: Mapping[str, LayerStats] | None = None,
    cache: CacheArg = None,
    registry: Registry | None = None,
    progress: bool = True,
    error: str = "auto",
) -> ErrorTable:
    """The error table of every matrix ``targets`` selects in ``model``, over every option of ``quantizers``.

    ``error``: ``"auto"``, ``"frobenius"``, ``"fisher"``, ``"output"`` or ``"kfac"`` (see the module docstring).
    """
    registry = registry or get_registry()
    target_cfg: TargetConfig = validate_config(TargetConfig, targets, what="targets")
    names = find_targets(model, target_cfg)
    if not names:
        raise ValueError(f"no linear layer matches include={target_cfg.include} exclude={target_cfg.exclude}")
    _weighting(names, stats, error)  # fail before quantizing anything
    if options is None:
        options = collect_options(registry, quantizers)
    weights = ((n, _dense_weight(model.get_submodule(n)).detach()) for n in names)
    table = build_error_table(
        weights, options, stats=stats, cache=cache, registry=registry, progress=progress, total=len(names),
        error=error,
    )
    return table
