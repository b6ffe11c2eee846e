"""plan_model end to end: the plan JSON feeds quantize_model and the bits match the summary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lqmod import hookimpl
from lqmod.allocation.command import write_plan
from lqmod.allocation.planner import allocate_table, plan_model
from lqmod.allocation.table import build_model_error_table
from lqmod.config import ConfigError, FrozenModel, Plan, TargetConfig
from lqmod.model import find_targets, quantize_model
from lqmod.plugins import Registry
from lqmod.types import AllocationProblem, AllocationResult, AllocatorSpec, InfeasibleBudget

QUANTIZERS = ["nf", "rtn"]  # the others are slower and not what these tests are about


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One error-table cache for the module: tiny_llama is rebuilt with the same seed, so it hits."""
    return tmp_path_factory.mktemp("table-cache")


@pytest.mark.parametrize("allocator", ["ilp", "greedy"])
def test_plan_roundtrip_feeds_quantize_model(
    tiny_llama: torch.nn.Module, alloc_registry: Registry, tmp_path: Path, cache_dir: Path, allocator: str
) -> None:
    plan, summary = plan_model(
        tiny_llama,
        "3.25",
        allocator=allocator,
        quantizers=QUANTIZERS,
        cache=cache_dir,
        registry=alloc_registry,
        progress=False,
    )
    assert set(plan.modules) == set(find_targets(tiny_llama, TargetConfig()))
    assert summary["achieved"]["bits_per_param"] <= 3.25
    assert summary["allocator"] == allocator
    path = tmp_path / "plan.json"
    write_plan(plan, path)
    with pytest.raises(FileExistsError):
        write_plan(plan, path)
    loaded = Plan.model_validate(json.loads(path.read_text()))
    assert loaded == plan
    report = quantize_model(tiny_llama, plan=loaded, registry=alloc_registry, progress=False)
    assert report.bits_per_param == pytest.approx(summary["achieved"]["bits_per_param"], rel=1e-12)
    assert report.n_params == summary["n_params"]
    # Each layer got exactly the option the plan chose.
    for layer in report.layers:
        assert layer.quantizer == plan.modules[layer.name].quantizer
        assert layer.config == plan.modules[layer.name].config


def test_summary_contents(tiny_llama: torch.nn.Module, alloc_registry: Registry, cache_dir: Path) -> None:
    table = build_model_error_table(
        tiny_llama, quantizers=QUANTIZERS, cache=cache_dir, registry=alloc_registry, progress=False
    )
    plan, s = allocate_table(table, "3.25", registry=alloc_registry)
    assert s["status"] == "optimal"
    assert s["solver"]["dominated_pruned"] > 0
    assert sum(r["matrices"] for r in s["by_option"].values()) == len(plan.modules)
    assert sum(r["params"] for r in s["by_quantizer"].values()) == s["n_params"]
    assert s["budget"]["bits"] == int(3.25 * s["n_params"])
    assert s["total_error"] <= s["best_uniform"]["total_error"]
    json.dumps(plan.model_dump())  # JSON-able throughout
    # Greedy never beats the optimum; bytes budgets work alike.
    _, g = allocate_table(table, "3.25", allocator="greedy", registry=alloc_registry)
    assert g["total_error"] >= s["total_error"] * (1 - 1e-9)
    nbytes = int(s["budget"]["bits"] // 8)
    _, b = allocate_table(table, f"{nbytes}B", registry=alloc_registry)
    assert b["achieved"]["bits"] <= nbytes * 8


def test_infeasible_plan_names_the_minimum(
    tiny_llama: torch.nn.Module, alloc_registry: Registry, cache_dir: Path
) -> None:
    table = build_model_error_table(
        tiny_llama, quantizers=QUANTIZERS, cache=cache_dir, registry=alloc_registry, progress=False
    )
    low = sum(min(c.bits for c in r) for r in table.candidates.values())
    with pytest.raises(InfeasibleBudget, match=rf"{low / table.n_params:.4f} bits/param") as info:
        allocate_table(table, "1.0", registry=alloc_registry)
    assert info.value.min_bits == low
    assert f"{low / 8:.0f} bytes" in str(info.value)
    _, s = allocate_table(table, f"{low / table.n_params!r}", registry=alloc_registry)
    assert s["achieved"]["bits"] == low


def test_bad_input_fails_before_work(tiny_llama: torch.nn.Module, alloc_registry: Registry) -> None:
    with pytest.raises(ConfigError, match="accepted"):
        plan_model(tiny_llama, "lots", registry=alloc_registry, cache=False, progress=False)
    with pytest.raises(KeyError, match="Choose one of"):
        plan_model(tiny_llama, 3, allocator="nope", registry=alloc_registry, cache=False, progress=False)
    with pytest.raises(ConfigError, match="time_limit"):
        plan_model(
            tiny_llama, 3, allocator_config={"time_limit": -1}, registry=alloc_registry, cache=False, progress=False
        )


@pytest.mark.slow
def test_cli_plan(minilm_dir: str, alloc_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lqmod.plugins
    from lqmod.cli import main

    monkeypatch.setattr(lqmod.plugins, "_default", alloc_registry)
    out = tmp_path / "plan.json"
    args = ["plan", "--model", "minilm", "--budget", "3.25", "--quantizers", "nf,rtn", "--no-progress"]
    args += ["--include", r"encoder\.layer\.0\.attention", "--cache-dir", str(tmp_path / "c"), "--out", str(out)]
    assert main(args) == 0
    plan = Plan.model_validate_json(out.read_text())
    assert len(plan.modules) == 4
    assert plan.summary["achieved"]["bits_per_param"] <= 3.25
    assert main([*args, "--overwrite", "--budget", "0.5"]) == 2  # infeasible: one clear line
    pytest.importorskip("lqmod.calibration", reason="--fisher needs lqmod.calibration")
    assert main([*args, "--overwrite", "--fisher", "--n-calib", "8", "--quantizers", "nf"]) == 0
    fisher_plan = Plan.model_validate_json(out.read_text())
    assert fisher_plan.summary["error_weighting"] == "fisher"
    assert {e.quantizer for e in fisher_plan.modules.values()} == {"nf"}


def test_cli_plan_rejects_bad_input_before_loading(
    alloc_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lqmod.plugins
    from lqmod.cli import main

    monkeypatch.setattr(lqmod.plugins, "_default", alloc_registry)

    out = tmp_path / "plan.json"
    base = ["plan", "--model", "no-such-model", "--out", str(out)]
    assert main([*base, "--budget", "3 parsecs"]) == 2
    assert "accepted" in capsys.readouterr().out
    out.write_text("{}")
    assert main([*base, "--budget", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().out
    assert main([*base, "--budget", "3", "--overwrite"]) == 2  # unknown model: a clear FileNotFoundError
    assert "not found" in capsys.readouterr().out


class _Cheapest:
    """A third-party allocator, exactly as the hookspec's docstring shows it."""

    @hookimpl
    def lqmod_allocators(self) -> Iterator[AllocatorSpec]:
        def cheapest(problem: AllocationProblem, config: FrozenModel) -> AllocationResult:
            problem.check_feasible()
            choice = {
                name: min(range(len(rows)), key=lambda i: rows[i].bits) for name, rows in problem.candidates.items()
            }
            return AllocationResult(choice, status="heuristic")

        yield AllocatorSpec("cheapest", FrozenModel, cheapest)


class _OverBudget:
    @hookimpl
    def lqmod_allocators(self) -> Iterator[AllocatorSpec]:
        def greedy_for_bits(problem: AllocationProblem, config: FrozenModel) -> dict[str, int]:
            # a plain mapping is accepted; this one ignores the budget: the planner must refuse it
            return {n: max(range(len(r)), key=lambda i: r[i].bits) for n, r in problem.candidates.items()}

        yield AllocatorSpec("over", FrozenModel, greedy_for_bits)  # type: ignore[arg-type]


def test_third_party_allocators(tiny_llama: torch.nn.Module, alloc_registry: Registry, cache_dir: Path) -> None:
    alloc_registry.register(_Cheapest(), name="cheapest-test")
    alloc_registry.register(_OverBudget(), name="over-test")
    table = build_model_error_table(
        tiny_llama, quantizers=QUANTIZERS, cache=cache_dir, registry=alloc_registry, progress=False
    )
    _, s = allocate_table(table, 4.0, allocator="cheapest", registry=alloc_registry)
    assert s["achieved"]["bits_per_param"] == pytest.approx(s["min_feasible_bits_per_param"])
    with pytest.raises(RuntimeError, match="exceeded the budget"):
        allocate_table(table, 4.0, allocator="over", registry=alloc_registry)
