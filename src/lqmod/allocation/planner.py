"""From a model and a budget to a :class:`~lqmod.config.Plan`: error table, allocator, summary."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from lqmod.allocation.budget import Budget, parse_budget
from lqmod.allocation.table import CacheArg, ErrorTable, build_model_error_table
from lqmod.config import Plan, PlanEntry, TargetConfig, validate_config
from lqmod.plugins import Registry, get_registry
from lqmod.types import AllocationResult, InfeasibleBudget, LayerStats

__all__ = ["allocate_table", "plan_model"]


def allocate_table(
    table: ErrorTable,
    budget: Budget | str | float,
    *,
    allocator: str = "ilp",
    allocator_config: Any = None,
    registry: Registry | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """Run an allocator over a built table; returns the plan and its summary (also in ``plan.summary``)."""
    registry = registry or get_registry()
    spec = registry.allocator(allocator)
    cfg = validate_config(spec.config_model, allocator_config, what=f"{allocator} allocator config")
    budget = parse_budget(budget)
    n_params = table.n_params
    budget_bits = budget.total_bits(n_params)
    problem = table.problem(budget_bits)
    start = time.perf_counter()
    try:
        result = spec.allocate(problem, cfg)
    except InfeasibleBudget as exc:
        # Re-raised so the message always has bits/param, whatever the allocator knew.
        raise InfeasibleBudget(exc.budget_bits, exc.min_bits, n_params) from None
    seconds = time.perf_counter() - start
    if isinstance(result, Mapping):  # a plain {matrix: index} answer is accepted too
        result = AllocationResult(dict(result))
    _check_result(problem.candidates, result, budget_bits, allocator)
    total_error, total_bits = problem.cost(result.choice)

    modules: dict[str, PlanEntry] = {}
    for name in table.matrices:
        option = problem.candidates[name][result.choice[name]].option
        modules[name] = PlanEntry(quantizer=option.quantizer, config=option.config.model_dump(mode="json"))
    summary = _summary(table, budget, budget_bits, result, allocator, seconds, total_error, total_bits)
    return Plan(modules=modules, summary=summary), summary


def _check_result(candidates: Mapping[str, Any], result: AllocationResult, budget_bits: int, allocator: str) -> None:
    missing = sorted(set(candidates) - set(result.choice))
    extra = sorted(set(result.choice) - set(candidates))
    bad = [n for n, i in result.choice.items() if n in candidates and not 0 <= i < len(candidates[n])]
    if missing or extra or bad:
        raise RuntimeError(
            f"allocator {allocator!r} returned an invalid choice (missing {missing[:3]}, unknown {extra[:3]}, "
            f"index out of range for {bad[:3]}): a plug-in bug"
        )
    total = sum(candidates[n][i].bits for n, i in result.choice.items())
    if total > budget_bits:
        raise RuntimeError(f"allocator {allocator!r} exceeded the budget ({total} > {budget_bits} bits): a plug-in bug")


def _summary(
    table: ErrorTable,
    budget: Budget,
    budget_bits: int,
    result: AllocationResult,
    allocator: str,
    seconds: float,
    total_error: float,
    total_bits: int,
) -> dict[str, Any]:
    n_params = table.n_params
    by_option: dict[str, dict[str, Any]] = {}
    by_quantizer: dict[str, dict[str, Any]] = {}
    for name, idx in result.choice.items():
        cand = table.candidates[name][idx]
        numel = table.matrices[name].numel
        for key, bucket in ((cand.option.label, by_option), (cand.option.quantizer, by_quantizer)):
            row = bucket.setdefault(key, {"matrices": 0, "params": 0, "bits": 0})
            row["matrices"] += 1
            row["params"] += numel
            row["bits"] += cand.bits
    for bucket in (by_option, by_quantizer):
        for row in bucket.values():
            row["bits_per_param"] = row["bits"] / row["params"]
    fitting = {lbl: v for lbl, v in table.uniform().items() if v[1] <= budget_bits}
    best_uniform = min(fitting.items(), key=lambda kv: kv[1][0]) if fitting else None
    return {
        "allocator": allocator,
        "status": result.status,
        "gap": result.gap,
        "solver": result.info,
        "solve_seconds": seconds,
        "budget": {
            "text": budget.text or budget.describe(),
            "bits": budget_bits,
            "bits_per_param": budget_bits / n_params,
            "bytes": budget_bits / 8,
        },
        "achieved": {"bits": total_bits, "bits_per_param": total_bits / n_params, "bytes": total_bits / 8},
        "min_feasible_bits_per_param": sum(min(c.bits for c in r) for r in table.candidates.values()) / n_params,
        "total_error": total_error,
        "error_weighting": table.weighting,
        "n_matrices": len(table.matrices),
        "n_params": n_params,
        "n_options": len(table.options),
        "by_quantizer": dict(sorted(by_quantizer.items())),
        "by_option": dict(sorted(by_option.items(), key=lambda kv: -kv[1]["params"])),
        "best_uniform": (
            None
            if best_uniform is None
            else {
                "option": best_uniform[0],
                "total_error": best_uniform[1][0],
                "bits_per_param": best_uniform[1][1] / n_params,
            }
        ),
        "skipped": table.skip_reasons(),
        "table": {"computed": table.computed, "cached": table.cached},
    }


def plan_model(
    model: nn.Module,
    budget: Budget | str | float,
    *,
    allocator: str = "ilp",
    allocator_config: Any = None,
    quantizers: Iterable[str] | None = None,
    targets: TargetConfig | Mapping[str, Any] | None = None,
    stats: Mapping[str, LayerStats] | None = None,
    cache: CacheArg = None,
    registry: Registry | None = None,
    progress: bool = True,
    error: str = "auto",
) -> tuple[Plan, dict[str, Any]]:
    """Choose a quantizer and config for every target matrix of ``model`` within ``budget``.

    ``budget``: average bits per parameter (``3.25``, ``"3.25bits"``) or bytes (``"12MB"``,
    ``"12MiB"``, ``"1234567B"``) for the target matrices' storage. ``quantizers`` limits the
    options (default: every registered quantizer); ``stats`` (module name -> LayerStats) feeds
    quantizers that need statistics and the error measure: ``error="auto"`` weights the error by
    the Fisher when every matrix has ``fisher`` (else plain ``||W - Q||^2``); ``"output"`` uses
    the calibrated output error ``tr(dW H dW^T) / n`` from ``hessian`` (see
    :mod:`lqmod.allocation.table`).
    The plan is what ``quantize_model(model, plan=plan)`` reads; the summary is also
    ``plan.summary`` (budget, achieved bits, total error, histograms, solver status, timing).
    """
    registry = registry or get_registry()
    budget = parse_budget(budget)  # a malformed budget fails before the table is built
    spec = registry.allocator(allocator)
    validate_config(spec.config_model, allocator_config, what=f"{allocator} allocator config")
    start = time.perf_counter()
    table = build_model_error_table(
        model, quantizers=quantizers, targets=targets, stats=stats, cache=cache, registry=registry, progress=progress,
        error=error,
    )
    table_seconds = time.perf_counter() - start
    plan, summary = allocate_table(
        table, budget, allocator=allocator, allocator_config=allocator_config, registry=registry
    )
    summary["table"]["seconds"] = table_seconds
    if not math.isfinite(summary["total_error"]):
        raise RuntimeError(f"the plan's total error is {summary['total_error']}: an error table bug")
    return plan, summary
