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
from lqmod.allocation.measures import (
    ERROR_MEASURES,
    _check_stats,
    _measures_for,
    _weighting,
    kfac_error,
    output_error,
    resolve_error_measure,
    weighted_error,
)
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
