"""The benchmark collects a diagonal Fisher when a row's quantizer needs one, and passes it on."""

from __future__ import annotations

import pytest
import torch
from calib_helpers import Recorder

import lqmod_lora_default
from lqmod.bench import run as bench_run
from lqmod.bench.calib import TokenSplits
from lqmod.bench.matrix import RowSpec
from lqmod.bench.methods import build_method
from lqmod.calibration import diagonal_fisher
from lqmod.plugins import Registry


def _registry(rec: Recorder) -> Registry:
    r = Registry(autoload=False)
    r.register(lqmod_lora_default, name="lora-default")
    r.register(rec, name="rec")
    return r


def test_method_passes_fisher_through() -> None:
    rec = Recorder("fish", frozenset({"fisher"}))
    method = build_method(RowSpec("lqmod", "fish"), _registry(rec))
    assert method.needs_fisher and not method.needs_hessian
    w, f = torch.randn(4, 6), torch.rand(4, 6)
    method.quantize(w, None, 0, f)
    ((_, stats),) = rec.calls
    assert stats is not None and stats.fisher is f and stats.hessian is None


def test_run_bench_collects_fisher_for_rows_that_need_it(
    tiny_llama: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder("fish", frozenset({"fisher"}))
    monkeypatch.setattr(bench_run, "get_registry", lambda: _registry(rec))
    g = torch.Generator().manual_seed(0)
    splits = TokenSplits(
        calib=torch.randint(0, 101, (3, 10), generator=g),
        eval=torch.randint(0, 101, (1, 10), generator=g),
        train=torch.zeros(0, 10, dtype=torch.long),
    )
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    w = bench_run.Workload("tiny", "causal-lm", tiny_llama, None, targets, splits, {}, {}, {"value": 1.0})
    rows = [RowSpec("lqmod", "fish"), RowSpec("baseline", "rtn")]
    assert bench_run.rows_need_fisher(rows) and not bench_run.rows_need_fisher(rows[1:])
    bench_run.collect_fisher(w, progress=False)
    ref = diagonal_fisher(tiny_llama, targets, [{"input_ids": x.unsqueeze(0)} for x in splits.calib], progress=False)
    for name in targets:
        torch.testing.assert_close(w.fisher[name], ref[name])
    result = bench_run.run_row(rows[0], w, progress=False)
    assert result["status"] == "ok", result
    got = {tuple(call[0].shape): call[1] for call in rec.calls}
    for name in targets:
        stats = got[tuple(tiny_llama.get_parameter(f"{name}.weight").shape)]
        assert stats is not None and torch.equal(stats.fisher, w.fisher[name])
