"""The error table: for every target matrix and every option, its error and exact storage bits.

Built matrix by matrix (a progress bar per matrix), each option's result written to the
:class:`~lqmod.allocation.cache.TableCache` as soon as it is known. The error is
``||W - Q||_F^2``, or ``sum(F * (W - Q)^2)`` with a diagonal Fisher ``F`` when every matrix
has ``LayerStats.fisher``; sums run in float64.
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

__all__ = ["ErrorTable", "MatrixInfo", "build_error_table", "build_model_error_table", "weighted_error"]

CacheArg = TableCache | str | os.PathLike[str] | bool | None
# Rows of at most this many elements are reduced at a time: float64 temporaries stay small.
_CHUNK = 1 << 22


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


def _weighting(names: list[str], stats: Mapping[str, LayerStats] | None) -> str:
    with_fisher = [n for n in names if stats and stats.get(n) is not None and stats[n].fisher is not None]
    if not with_fisher:
        return "frobenius"
    missing = [n for n in names if n not in with_fisher]
    if missing:
        raise ValueError(
            f"Fisher statistics given for {len(with_fisher)} of {len(names)} matrices (missing e.g. {missing[:3]}); "
            "errors must be weighted alike: give a Fisher for every target matrix or for none"
        )
    return "fisher"


def _measure(
    spec: QuantizerSpec,
    option: Option,
    weight: torch.Tensor,
    stats: LayerStats | None,
    fisher: torch.Tensor | None,
    name: str,
) -> dict[str, Any]:
    """Quantize one matrix with one option: a record with error and exact bits, or a skip reason."""
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    numel = shape[0] * shape[1]
    try:
        predicted = spec.bits_per_param(option.config, shape)
        qw = quantize_weight(spec, weight, option.config, stats, name=name)
    except QuantizationError as exc:
        return {"label": option.label, "skipped": f"QuantizationError: {exc}"}
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
    error = weighted_error(weight, approx, fisher)
    if not math.isfinite(error):
        return {"label": option.label, "skipped": f"non-finite error {error!r}"}
    return {"label": option.label, "error": error, "bits": int(bits)}


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
) -> ErrorTable:
    """Error table of named (out, in) weights, streamed: one weight is held at a time.

    ``weights`` may be a generator; ``total`` sizes the progress bar. ``cache``: a
    :class:`TableCache`, a directory, None/True for the default root, False for none.
    """
    registry = registry or get_registry()
    specs = {o.quantizer: registry.quantizer(o.quantizer) for o in options}
    keys = [option_key(o, registry) for o in options]
    store = _resolve_cache(cache)
    # Fisher weighting is all-or-none: each matrix is checked as it streams past.
    has_fisher = bool(stats) and any(s is not None and s.fisher is not None for s in (stats or {}).values())
    weighting = "fisher" if has_fisher else "frobenius"
    table = ErrorTable(options=list(options), weighting=weighting)
    bar = tqdm(weights, total=total, desc="error table", unit="matrix", disable=not progress)
    for name, weight in bar:
        if weight.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        layer_stats = stats.get(name) if stats else None
        fisher = layer_stats.fisher if layer_stats is not None else None
        if weighting == "fisher":
            if fisher is None:
                raise ValueError(f"{name}: no Fisher statistics, but other matrices have them; give all or none")
            if tuple(fisher.shape) != tuple(weight.shape):
                raise ValueError(
                    f"{name}: Fisher shape {tuple(fisher.shape)} differs from the (out, in) weight shape "
                    f"{tuple(weight.shape)}"
                )
        info = MatrixInfo(name, (int(weight.shape[0]), int(weight.shape[1])), tensor_hash(weight))
        table.matrices[name] = info
        s_key = stats_hash(layer_stats)
        records = store.load(info.weight_hash, s_key, weighting) if store is not None else {}
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
                record = _measure(spec, option, weight, layer_stats, fisher, name)
                table.computed += 1
                if store is not None:
                    records[key] = record
                    store.save(info.weight_hash, s_key, weighting, records)
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
) -> ErrorTable:
    """The error table of every matrix ``targets`` selects in ``model``, over every option of ``quantizers``."""
    registry = registry or get_registry()
    target_cfg: TargetConfig = validate_config(TargetConfig, targets, what="targets")
    names = find_targets(model, target_cfg)
    if not names:
        raise ValueError(f"no linear layer matches include={target_cfg.include} exclude={target_cfg.exclude}")
    _weighting(names, stats)  # fail before quantizing anything
    if options is None:
        options = collect_options(registry, quantizers)
    weights = ((n, _dense_weight(model.get_submodule(n)).detach()) for n in names)
    table = build_error_table(
        weights, options, stats=stats, cache=cache, registry=registry, progress=progress, total=len(names)
    )
    return table
