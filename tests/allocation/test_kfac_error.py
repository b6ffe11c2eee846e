"""The K-FAC loss-change measure ``sum_i G_i (dW H dW^T)_ii / n`` of the error table (issue 11, part 2)."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lqmod
from lqmod.allocation.command import _error_measure, register
from lqmod.allocation.planner import plan_model
from lqmod.allocation.table import build_error_table, kfac_error, resolve_error_measure
from lqmod.calibration import collect_hessians, diagonal_fisher
from lqmod.config import TargetConfig
from lqmod.model import find_targets
from lqmod.plugins import Registry
from lqmod.types import LayerStats, Option
from lqmod_example_rtn.quantizer import RTNConfig
from lqmod_nf.quantizer import NFConfig
from lqmod_optq.config import OPTQConfig

OPTIONS = [
    Option("nf", NFConfig(bits=3, blocksize=64, double_quant=True)),
    Option("optq", OPTQConfig(bits=3, group_size=64, sym=False)),
    Option("rtn", RTNConfig(bits=2, group_size=32)),
]



def kron_form(dw: torch.Tensor, fisher: torch.Tensor, hessian: torch.Tensor, n: int) -> float:
    """vec(dW)^T (diag(G) (x) A) vec(dW) with an explicit Kronecker product (row-major vec)."""
    a = hessian.double() / n
    g = n * fisher.double().sum(1) / float(hessian.double().diagonal().sum())
    k = torch.kron(torch.diag(g), a)
    v = dw.double().reshape(-1)
    return float(v @ k @ v)


def test_kfac_error_is_the_kronecker_quadratic_form() -> None:
    gen = torch.Generator().manual_seed(0)
    w, q = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    x = torch.randn(17, 5, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 0.1, 2.0]).double()
    h = x.T @ x
    fisher = torch.rand(3, 5, generator=gen) + 0.1
    ref = kron_form(w.double() - q.double(), fisher, h, 17)
    assert kfac_error(w, q, h, fisher) == pytest.approx(ref, rel=1e-12)
    # n cancels and H's scale does not matter (it only sets the input directions' weights).
    assert kfac_error(w, q, 7.0 * h, fisher) == pytest.approx(ref, rel=1e-12)
    assert kfac_error(w, q, h, 2.0 * fisher) == pytest.approx(2.0 * ref, rel=1e-12)
    assert kfac_error(w, w, h, fisher) == 0.0
    assert kfac_error(w, q, torch.zeros(5, 5, dtype=torch.float64), fisher) == 0.0  # dead inputs: no error


class _GradProbe(nn.Module):
    """``lin(x)``; the loss of an example is ``sum_t g_t . lin(x_t)``, so its output gradient is ``g_t``."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _probe_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return (model(**batch) * batch["g"]).sum(dim=(1, 2))


def test_kfac_from_calibration_stats_is_the_exact_fisher_form_when_its_assumptions_hold() -> None:
    """Where K-FAC is exact, the measure from diagonal_fisher + collect_hessians is the true Fisher form.

    Examples of T = 2 tokens; token t's output gradient is ``c * sigma_t`` with every pair of
    sign vectors (sigma_1, sigma_2) combined with every pair of inputs: the gradients are then
    exactly uncorrelated across outputs, across tokens and with the inputs, so ``F_full = T A (x)
    diag(G)`` holds exactly in the sample, and only the normalisations (a per-example mean in F,
    a token sum in H) decide whether the measure matches ``vec(dW)^T F_full vec(dW)``.
    """
    gen = torch.Generator().manual_seed(3)
    out_f, in_f = 2, 4
    c = torch.tensor([0.7, 2.0])
    signs = [torch.tensor(s, dtype=torch.float32) for s in itertools.product((-1.0, 1.0), repeat=out_f)]
    inputs = [torch.randn(2, in_f, generator=gen) for _ in range(3)]  # (token pair) per input set
    xs, gs = [], []
    for pair, s1, s2 in itertools.product(inputs, signs, signs):
        xs.append(pair)
        gs.append(torch.stack([c * s1, c * s2]))
    x, g = torch.stack(xs), torch.stack(gs)  # (E, T, in), (E, T, out)
    w = torch.randn(out_f, in_f, generator=gen)
    model = _GradProbe(w)
    batches = [{"x": x[i : i + 8], "g": g[i : i + 8]} for i in range(0, x.shape[0], 8)]
    fisher = diagonal_fisher(model, ["lin"], batches, _probe_loss, progress=False)["lin"]
    stats = collect_hessians(model, ["lin"], batches, progress=False)["lin"]
    assert stats.hessian is not None and stats.n_tokens == 2 * x.shape[0]
    # The true empirical Fisher, from the explicit per-example gradients sum_t g_t x_t^T.
    grads = torch.einsum("eto,eti->eoi", g.double(), x.double()).reshape(x.shape[0], -1)
    f_full = grads.T @ grads / x.shape[0]
    dw = torch.randn(out_f, in_f, generator=gen)
    exact = float(dw.double().reshape(-1) @ f_full @ dw.double().reshape(-1))
    measured = kfac_error(w + dw, w, stats.hessian, fisher)
    assert measured == pytest.approx(exact, rel=1e-5)  # float32 Fisher sums
    rounded = (w + dw).double() - w.double()
    assert measured == pytest.approx(kron_form(rounded, fisher, stats.hessian, stats.n_tokens), rel=1e-9)


def problem(seed: int = 0) -> tuple[list[tuple[str, torch.Tensor]], dict[str, LayerStats]]:
    gen = torch.Generator().manual_seed(seed)
    weights, stats = [], {}
    for name, (out_f, in_f) in {"a": (12, 64), "b": (8, 128)}.items():
        w = torch.randn(out_f, in_f, generator=gen)
        x = torch.randn(200, in_f, generator=gen) * torch.logspace(0, -1, in_f)
        fisher = torch.rand(out_f, in_f, generator=gen) * torch.logspace(1, -1, out_f).unsqueeze(1)
        weights.append((name, w))
        stats[name] = LayerStats(hessian=x.double().T @ x.double(), n_tokens=200, fisher=fisher)
    return weights, stats


def test_table_kfac_rows_are_hand_computed(reg: Registry) -> None:
    weights, stats = problem()
    table = build_error_table(weights, OPTIONS, stats=stats, cache=False, registry=reg, progress=False, error="kfac")
    assert table.weighting == "kfac"
    checked = 0
    for name, w in weights:
        s = stats[name]
        assert s.hessian is not None and s.fisher is not None
        for cand in table.candidates[name]:
            spec = reg.quantizer(cand.option.quantizer)
            q = spec.materialize(lqmod.quantize_weight(spec, w, cand.option.config, s), torch.float32)
            ref = kron_form(w.double() - q.double(), s.fisher, s.hessian, s.n_tokens)
            assert cand.error == pytest.approx(ref, rel=1e-9)
            checked += 1
    assert checked == 6


def test_other_measures_table_gives_kfac_rows_for_free(reg: Registry, tmp_path: Path) -> None:
    weights, stats = problem()
    first = build_error_table(weights, OPTIONS, stats=stats, cache=tmp_path, registry=reg, progress=False,
                              error="output")
    assert first.computed == 6 and first.cached == 0
    kfac = build_error_table(weights, OPTIONS, stats=stats, cache=tmp_path, registry=reg, progress=False,
                             error="kfac")
    assert kfac.computed == 0 and kfac.cached == 6
    fresh = build_error_table(weights, OPTIONS, stats=stats, cache=False, registry=reg, progress=False, error="kfac")
    for name, _ in weights:
        assert [c.error for c in kfac.candidates[name]] == [c.error for c in fresh.candidates[name]]
        assert [c.error for c in kfac.candidates[name]] != [c.error for c in first.candidates[name]]
    # ... and the other way round: a kfac-first table serves the fisher measure from its cache.
    other = tmp_path / "other"
    build_error_table(weights, OPTIONS, stats=stats, cache=other, registry=reg, progress=False, error="kfac")
    fisher = build_error_table(weights, OPTIONS, stats=stats, cache=other, registry=reg, progress=False,
                               error="fisher")
    assert fisher.computed == 0 and fisher.cached == 6
    # Without a Fisher no kfac record is written: a later kfac table over Hessians alone is refused.
    hess_only = {n: LayerStats(hessian=s.hessian, n_tokens=s.n_tokens) for n, s in stats.items()}
    build_error_table(weights, OPTIONS, stats=hess_only, cache=tmp_path / "h", registry=reg, progress=False,
                      error="output")
    assert not list((tmp_path / "h").rglob("*-kfac.json"))


def test_missing_statistics_are_one_line_errors(reg: Registry) -> None:
    weights, stats = problem()
    hess_only = {n: LayerStats(hessian=s.hessian, n_tokens=s.n_tokens) for n, s in stats.items()}
    fisher_only = {n: LayerStats(fisher=s.fisher) for n, s in stats.items()}
    kw: dict[str, Any] = {"cache": False, "registry": reg, "progress": False, "error": "kfac"}
    with pytest.raises(ValueError, match=r"'kfac' needs stats\.fisher .* and stats\.hessian .* lacks stats\.fisher "
                       r".*allow \(frobenius, output\)") as exc:
        build_error_table(weights, OPTIONS[:1], stats=hess_only, **kw)
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"lacks stats\.hessian .*allow \(frobenius, fisher\)"):
        build_error_table(weights, OPTIONS[:1], stats=fisher_only, **kw)
    with pytest.raises(ValueError, match=r"lacks stats\.fisher \(diagonal Fisher\), stats\.hessian"):
        build_error_table(weights, OPTIONS[:1], stats=None, **kw)
    with pytest.raises(ValueError, match=r"stats\.hessian given for 0 of 2 .*allow \(frobenius, fisher\)") as exc:
        resolve_error_measure("kfac", ["a", "b"], fisher_only)
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"stats\.fisher given for 1 of 2"):
        resolve_error_measure("kfac", ["a", "b"], {"a": stats["a"], "b": hess_only["b"]})
    assert resolve_error_measure("kfac", ["a", "b"], stats) == "kfac"
    assert resolve_error_measure("auto", ["a", "b"], stats) == "fisher"  # auto never picks kfac
    with pytest.raises(ValueError, match="accepted: auto, frobenius, fisher, output, kfac"):
        build_error_table(weights, OPTIONS[:1], stats=stats, cache=False, registry=reg, progress=False, error="loss")
    def transposed_fisher(s: LayerStats) -> LayerStats:
        assert s.fisher is not None
        return LayerStats(s.hessian, s.n_tokens, s.fisher.T)

    bad = {n: transposed_fisher(s) for n, s in stats.items()}
    with pytest.raises(ValueError, match=r"a: Fisher shape \(64, 12\) differs"):
        build_error_table(weights, OPTIONS[:1], stats=bad, **kw)


def test_plan_model_with_kfac(tiny_llama: nn.Module, reg: Registry, tmp_path: Path) -> None:
    targets = {"include": [r"layers\.0\.self_attn"]}
    names = find_targets(tiny_llama, TargetConfig(include=targets["include"]))
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 101, (2, 16))} for _ in range(3)]
    hess = collect_hessians(tiny_llama, names, batches, progress=False)
    fisher = diagonal_fisher(tiny_llama, names, batches, progress=False)
    stats = {n: LayerStats(h.hessian, h.n_tokens, fisher[n]) for n, h in hess.items()}
    plan, summary = plan_model(
        tiny_llama, "3.5", quantizers=["optq", "nf"], targets=targets, stats=stats, cache=tmp_path, registry=reg,
        progress=False, error="kfac",
    )
    assert summary["error_weighting"] == "kfac"
    total = 0.0
    for name, entry in plan.modules.items():
        spec = reg.quantizer(entry.quantizer)
        weight = tiny_llama.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        w = weight.detach()
        q = spec.materialize(lqmod.quantize_weight(spec, w, entry.config, stats[name]), torch.float32)
        s = stats[name]
        assert s.hessian is not None and s.fisher is not None
        total += kron_form(w.double() - q.double(), s.fisher, s.hessian, s.n_tokens)
    assert summary["total_error"] == pytest.approx(total, rel=1e-9)


def test_cli_accepts_kfac() -> None:
    assert _error_measure(argparse.Namespace(fisher=False, error="kfac")) == "kfac"
    with pytest.raises(ValueError, match="--error is 'kfac'"):
        _error_measure(argparse.Namespace(fisher=True, error="kfac"))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--budget", "3", "--error", "kfac", "--out", "p.json"])
    assert args.error == "kfac"
    with pytest.raises(SystemExit):
        parser.parse_args(["plan", "--budget", "3", "--error", "hutchinson", "--out", "p.json"])
