"""Adapter variants after the same finetuning budget over shared quantized bases (``lqmod bench adapters``).

Each base (a quantizer spec, e.g. ``nf:bits=3,blocksize=64``) quantizes the model once, with
plain LoRA adapters from the ``default`` initializer's settings of :func:`lqmod.model.quantize_model`.
Every variant then starts from a copy of that model, its adapters converted in place
(:func:`lqmod.model.convert_adapters`: the same ``A`` and ``B`` over the same frozen base, so at
their default settings all variants compute the same step-0 function; checked on one probe
batch) and trains for the same steps on the same batches (seed, lr, rank alike). Variants are
registry names: by default every registered adapter variant.

Objectives, by model kind:

* encoder (MiniLM): distil the fp32 sentence embeddings, ``1 - cos`` on WikiText-2 training
  sentences (the :mod:`lqmod.bench.finetune` objective); metric: mean cosine to fp32 on held-out
  sentences;
* causal LM (SmolLM2): next-token loss on packed WikiText-2 validation windows
  (:func:`lqmod.train.train_causal_lm`); metric: perplexity on the first tokens of WikiText-2 raw test.

The parts: settings and the choice of bases and variants in :mod:`lqmod.bench.adapters_settings`,
the objectives in :mod:`lqmod.bench.adapters_tasks`, the side measurements (step-0 outputs, clocks,
memory, one layer's timing) in :mod:`lqmod.bench.adapters_measure`, the outputs in
:mod:`lqmod.bench.adapters_report`.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lqmod.bench.adapters_measure import _clock, _environment, _first_output, _moved, _own_params, _rss_bytes
from lqmod.bench.adapters_measure import layer_timing as layer_timing
from lqmod.bench.adapters_settings import AdapterBenchSettings, default_bases, select_bases, select_variants
from lqmod.bench.adapters_tasks import Task, load_task
from lqmod.bench.matrix import RowSpec, format_spec
from lqmod.bench.memory import rss_peak_meter
from lqmod.plugins import get_registry

__all__ = ["SCHEMA", "AdapterBenchSettings", "default_bases", "run_adapter_bench", "select_variants"]

SCHEMA = "lqmod.bench_adapters/1"


def run_base(task: Task, s: AdapterBenchSettings, base: RowSpec, variants: list[str]) -> dict[str, Any]:
    """One base quantized once, then every variant trained from it; the base's JSON record."""
    from lqmod.model import convert_adapters, quantize_model

    registry = get_registry()
    spec = registry.quantizer(base.name)
    needs = set(spec.needs)
    stats = task.stats(needs) if needs else None
    model = copy.deepcopy(task.model)
    with _clock() as qclock:
        report = quantize_model(model, base.name, dict(base.config), lora={"r": s.rank, "alpha": 2.0 * s.rank},
                                targets=task.targets or None, stats=stats, seed=s.seed,
                                progress=s.progress)  # fmt: skip
    ref = _first_output(model, task.probe)
    before = task.score(model)
    rec: dict[str, Any] = {"base": format_spec(base), "bits_per_param": report.bits_per_param,
                           "n_layers": len(report.layers), "quantize": qclock, "metric_before": before,
                           "variants": {}}  # fmt: skip
    for variant in variants:
        m = copy.deepcopy(model)
        convert_adapters(m, variant)  # a no-op for layers already of that variant
        step0 = float((_first_output(m, task.probe) - ref).abs().max())
        own0 = _own_params(m)
        torch.manual_seed(s.seed)
        rss0 = _rss_bytes()
        with rss_peak_meter() as rss, _clock() as clock:
            run = task.train(m, f"{base.name}{base.config.get('bits', '')} {variant}")
        after = task.score(m)
        rec["variants"][variant] = {
            **run,
            "metric_after": after,
            "step0_max_output_diff": step0,
            "train_wall_s": clock["wall_s"],
            "train_cpu_s": clock["cpu_s"],
            "train_peak_rss_delta_bytes": rss["delta"],
            "train_peak_rss_bytes": None if rss0 is None or rss["delta"] is None else rss0 + rss["delta"],
            "own_params": _moved(own0, _own_params(m)),
        }
        if s.progress:
            tqdm.write(f"{rec['base']} {variant}: {task.metric} {before:.5g} -> {after:.5g}, "
                       f"{clock['cpu_s']:.0f} CPU s")  # fmt: skip
        del m
    if s.layer_timing:
        rec["layer_timing"] = layer_timing(model, variants)
    return rec


def run_adapter_bench(settings: AdapterBenchSettings) -> dict[str, Any]:
    """Run every base x variant; returns the JSON-able results and writes JSON, Markdown and PNG."""
    from lqmod.bench.adapters_report import write_report

    load_start = os.getloadavg()
    variants = select_variants(settings.adapters)  # refused before the model loads
    t0 = time.perf_counter()
    task, s = load_task(settings)
    bases = select_bases(s.bases, task.kind)
    name = s.name or f"adapters_{task.name}"
    records: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    for b in tqdm(bases, desc=f"adapters {task.name}", unit="base", disable=not s.progress):
        records.append(run_base(task, s, b, variants))
        out = {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"name": task.name, "kind": task.kind, "n_target_layers": len(task.target_names)},
            "metric": task.metric,
            "objective": task.objective,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
            "lora": {"r": s.rank, "alpha": 2.0 * s.rank, "initializer": "registry default (LoRAConfig)"},
            "variants": variants,
            "bases": records,
            "complete": len(records) == len(bases),
            "task": task.settings,
            "environment": _environment(load_start),
            "seconds": time.perf_counter() - t0,
        }
        # Written after every base: a long run interrupted keeps what it measured.
        write_report(out, Path(s.out), name)
    return out
