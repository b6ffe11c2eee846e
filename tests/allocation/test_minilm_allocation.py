"""Must-show on real all-MiniLM-L6-v2 weights: the ILP plan beats every uniform configuration
within the same budget, and is never worse than greedy (benchmarks/bench_allocator.py reports
the full curve)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lqmod.allocation import allocate_table, build_model_error_table
from lqmod.model import quantize_model
from lqmod.plugins import Registry


@pytest.mark.slow
def test_ilp_beats_uniform_and_greedy_on_minilm(minilm_dir: str, alloc_registry: Registry, tmp_path: Path) -> None:
    from lqmod.hf import load_local_model

    torch.set_num_threads(1)
    model, _, _ = load_local_model(minilm_dir)
    # nf and rtn: every option needs no statistics, so the table is complete and quick (~40 s).
    table = build_model_error_table(
        model, quantizers=["nf", "rtn"], cache=tmp_path, registry=alloc_registry, progress=False
    )
    assert len(table.matrices) == 37
    uniform = table.uniform()
    assert len(uniform) > 20
    for budget in (3.25, 2.75):
        plan, ilp = allocate_table(table, budget, allocator="ilp", registry=alloc_registry)
        _, greedy = allocate_table(table, budget, allocator="greedy", registry=alloc_registry)
        assert ilp["status"] == "optimal"
        assert ilp["achieved"]["bits_per_param"] <= budget
        assert ilp["total_error"] <= greedy["total_error"] * (1 + 1e-9)
        fitting = {lbl: err for lbl, (err, bits) in uniform.items() if bits <= ilp["budget"]["bits"]}
        assert fitting, f"no uniform configuration fits {budget} bits/param"
        worse = {lbl: err for lbl, err in fitting.items() if not ilp["total_error"] < err}
        assert not worse, f"uniform configurations at least as good as the ILP plan at {budget}: {worse}"
        if budget == 3.25:
            report = quantize_model(model, plan=plan, registry=alloc_registry, progress=False)
            assert report.bits_per_param == pytest.approx(ilp["achieved"]["bits_per_param"], rel=1e-12)
