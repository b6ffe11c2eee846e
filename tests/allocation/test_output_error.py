"""The calibrated output error tr(dW H dW^T) / n as an error-table measure (issue 11, part 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import lqmod
from lqmod.allocation.command import _error_measure
from lqmod.allocation.planner import allocate_table, plan_model
from lqmod.allocation.table import build_error_table, output_error, resolve_error_measure
from lqmod.calibration import collect_hessians
from lqmod.config import TargetConfig
from lqmod.model import find_targets
from lqmod.plugins import Registry
from lqmod.types import LayerStats, Option
from lqmod_example_rtn.quantizer import RTNConfig
from lqmod_nf.quantizer import NFConfig
from lqmod_optq.config import OPTQConfig

# A few options of each kind (all of them would only repeat the same check, slower).
OPTIONS = [
    Option("nf", NFConfig(bits=3, blocksize=64, double_quant=True)),
    Option("nf", NFConfig(bits=4, blocksize=64, double_quant=False)),
    Option("optq", OPTQConfig(bits=3, group_size=64, sym=False)),
    Option("optq", OPTQConfig(bits=2, group_size=64, sym=True)),
    Option("rtn", RTNConfig(bits=3, group_size=32)),
]



def correlated_inputs(n: int, d: int, *, seed: int) -> torch.Tensor:
    """Inputs with a few dominant, correlated directions (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d).unsqueeze(1)
    return torch.randn(n, d, generator=g) @ mix + 0.01 * torch.randn(n, d, generator=g)


def problem(seed: int = 0) -> tuple[list[tuple[str, torch.Tensor]], dict[str, LayerStats], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    weights, stats, xs = [], {}, {}
    for name, (out_f, in_f) in {"a": (24, 64), "b": (16, 128)}.items():
        w = torch.randn(out_f, in_f, generator=g)
        x = correlated_inputs(300, in_f, seed=seed + in_f)
        weights.append((name, w))
        xs[name] = x
        stats[name] = LayerStats(hessian=x.double().T @ x.double(), n_tokens=x.shape[0])
    return weights, stats, xs



def test_output_error_is_the_float64_hand_computation(reg: Registry, tmp_path: Path) -> None:
    weights, stats, xs = problem()
    table = build_error_table(
        weights, OPTIONS, stats=stats, cache=tmp_path, registry=reg, progress=False, error="output"
    )
    assert table.weighting == "output"
    checked = 0
    for name, w in weights:
        x = xs[name].double()
        for cand in table.candidates[name]:
            spec = reg.quantizer(cand.option.quantizer)
            qw = lqmod.quantize_weight(spec, w, cand.option.config, stats[name])
            q = spec.materialize(qw, torch.float32).double()
            # by hand: the mean over the calibration inputs of ||(W - Q) x||^2, straight from X
            ref = ((x @ (w.double() - q).T) ** 2).sum().item() / x.shape[0]
            assert cand.error == pytest.approx(ref, rel=1e-9)
            checked += 1
    assert checked == 10
    assert {c.option.quantizer for c in table.candidates["a"]} == {"nf", "optq", "rtn"}


def test_output_error_function() -> None:
    g = torch.Generator().manual_seed(1)
    w, q = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    x = torch.randn(11, 7, generator=g, dtype=torch.float64)
    h = x.T @ x
    ref = ((x @ (w.double() - q.double()).T) ** 2).sum().item()
    assert output_error(w, q, h, 11) == pytest.approx(ref / 11, rel=1e-12)
    assert output_error(w, q, h, 0) == pytest.approx(ref, rel=1e-12)  # no count: the plain sum
    assert output_error(w, w, h, 11) == 0.0


def test_output_error_ranks_optq_above_rtn_where_weight_error_does_not(reg: Registry) -> None:
    """OPTQ trades weight error for output error: the two measures must disagree on it."""
    weights, stats, _ = problem()
    both = [
        Option("optq", OPTQConfig(bits=3, group_size=64, sym=False)),
        Option("rtn", RTNConfig(bits=3, group_size=64)),
    ]
    out = build_error_table(weights, both, stats=stats, cache=False, registry=reg, progress=False, error="output")
    fro = build_error_table(weights, both, stats=stats, cache=False, registry=reg, progress=False, error="frobenius")
    assert fro.weighting == "frobenius"
    for name, _ in weights:
        (oq, orr), (fq, fr) = out.candidates[name], fro.candidates[name]
        assert oq.error < orr.error  # OPTQ wins on what it minimises ...
        assert fq.error > fr.error  # ... and loses on plain weight error
        assert oq.bits == fq.bits


def test_cache_is_reused_and_measures_do_not_mix(reg: Registry, tmp_path: Path) -> None:
    weights, stats, _ = problem()
    opts = [o for o in OPTIONS if o.quantizer != "optq"]
    first = build_error_table(weights, opts, stats=stats, cache=tmp_path, registry=reg, progress=False, error="output")
    again = build_error_table(weights, opts, stats=stats, cache=tmp_path, registry=reg, progress=False, error="output")
    assert first.computed > 0 and first.cached == 0
    assert again.computed == 0 and again.cached == first.computed
    assert [c.error for c in again.candidates["a"]] == [c.error for c in first.candidates["a"]]
    # One quantization is measured every way its stats allow, each measure cached apart: the
    # frobenius table over the same weights and stats quantizes nothing, and its errors are
    # those of a table built from scratch (the measures never mix).
    fro = build_error_table(weights, opts, stats=stats, cache=tmp_path, registry=reg, progress=False, error="frobenius")
    assert fro.computed == 0 and fro.cached == first.computed
    fresh = build_error_table(weights, opts, stats=stats, cache=False, registry=reg, progress=False, error="frobenius")
    for name in ("a", "b"):
        assert [c.error for c in fro.candidates[name]] == [c.error for c in fresh.candidates[name]]
        assert [c.error for c in fro.candidates[name]] != [c.error for c in first.candidates[name]]
    # A different Hessian is a different key, never a stale hit.
    def doubled(s: LayerStats) -> LayerStats:
        assert s.hessian is not None
        return LayerStats(s.hessian * 2, s.n_tokens)

    other = {n: doubled(s) for n, s in stats.items()}
    moved = build_error_table(weights, opts, stats=other, cache=tmp_path, registry=reg, progress=False, error="output")
    assert moved.cached == 0
    a0, a1 = first.candidates["a"][0], moved.candidates["a"][0]
    assert a1.error == pytest.approx(2 * a0.error, rel=1e-9)  # nf ignores H: only the measure doubles


def test_missing_or_bad_hessians_are_clear_errors(reg: Registry) -> None:
    weights, stats, _ = problem()
    opts = OPTIONS[:1]
    with pytest.raises(ValueError, match=r"'output' needs stats\.hessian"):
        build_error_table(weights, opts, stats={"a": stats["a"]}, cache=False, registry=reg, progress=False,
                          error="output")
    bad = {n: LayerStats(hessian=torch.eye(3, dtype=torch.float64), n_tokens=3) for n, _ in weights}
    with pytest.raises(ValueError, match=r"Hessian shape \(3, 3\) is not \(in, in\)"):
        build_error_table(weights, opts, stats=bad, cache=False, registry=reg, progress=False, error="output")
    with pytest.raises(ValueError, match="accepted: auto, frobenius, fisher, output"):
        build_error_table(weights, opts, stats=stats, cache=False, registry=reg, progress=False, error="l1")
    with pytest.raises(ValueError, match="given for 1 of 2"):
        resolve_error_measure("output", ["a", "b"], {"a": stats["a"]})
    assert resolve_error_measure("auto", ["a", "b"], stats) == "frobenius"  # Hessians alone: weight space


def test_plan_model_with_output_error(tiny_llama: torch.nn.Module, reg: Registry, tmp_path: Path) -> None:
    targets = {"include": [r"layers\.0\.self_attn"]}
    names = find_targets(tiny_llama, TargetConfig(include=targets["include"]))
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 101, (1, 32))} for _ in range(6)]
    stats = collect_hessians(tiny_llama, names, batches, progress=False)
    plan, summary = plan_model(
        tiny_llama, "3.5", quantizers=["optq"], targets=targets, stats=stats, cache=tmp_path, registry=reg,
        progress=False, error="output",
    )
    assert summary["error_weighting"] == "output"
    assert summary["achieved"]["bits_per_param"] <= 3.5
    # The plan's total is the sum of the chosen rows' output errors, each recomputed by hand here.
    total = 0.0
    for name, entry in plan.modules.items():
        spec = reg.quantizer(entry.quantizer)
        w = tiny_llama.get_parameter(f"{name}.weight").detach()
        qw = lqmod.quantize_weight(spec, w, entry.config, stats[name])
        d = w.double() - spec.materialize(qw, torch.float32).double()
        h = stats[name].hessian
        assert h is not None
        total += float(((d @ h) * d).sum()) / stats[name].n_tokens
    assert summary["total_error"] == pytest.approx(total, rel=1e-9)
    # Reusing the cache: a second plan quantizes nothing.
    _, again = plan_model(
        tiny_llama, "3.5", quantizers=["optq"], targets=targets, stats=stats, cache=tmp_path, registry=reg,
        progress=False, error="output",
    )
    assert again["table"]["computed"] == 0


def test_allocate_table_summary_names_the_measure(reg: Registry) -> None:
    weights, stats, _ = problem()
    table = build_error_table(weights, OPTIONS, stats=stats, cache=False, registry=reg, progress=False, error="output")
    _, summary = allocate_table(table, 3.5, registry=reg)
    assert summary["error_weighting"] == "output"


def test_cli_error_flag() -> None:
    ns = argparse.Namespace
    assert _error_measure(ns(fisher=False, error="output")) == "output"
    assert _error_measure(ns(fisher=True, error="auto")) == "fisher"
    with pytest.raises(ValueError, match="--fisher asks for the Fisher-weighted error but --error is 'output'"):
        _error_measure(ns(fisher=True, error="output"))
