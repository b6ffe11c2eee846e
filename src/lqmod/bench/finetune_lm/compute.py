"""One row: build, evaluate, train and re-evaluate."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import torch
from torch import nn

from lqmod.bench.finetune_lm.build import _bnb, _fp_lora, _quantized, storage_bits
from lqmod.bench.finetune_lm.context import _Context
from lqmod.bench.finetune_lm.fingerprints import row_fingerprint
from lqmod.bench.finetune_lm.rows import LMRow
from lqmod.bench.finetune_lm.settings import LMBenchSettings
from lqmod.bench.finetune_lm.store import _atomic_write, _dump, _lqmod_version, _read_json


def _train_config(s: LMBenchSettings) -> Any:
    from lqmod.train import FinetuneConfig

    return FinetuneConfig(
        steps=s.steps, micro_batch_size=s.micro_batch, seq_len=s.seq_len, lr=s.lr, seed=s.seed, precision="fp32",
        warmup_steps=s.warmup, save_every=max(1, s.steps // 4), eval_every=0,
    )  # fmt: skip


def _perplexity(model: nn.Module, ctx: _Context) -> dict[str, Any]:
    from lqmod.evaluation import stream_perplexity

    t0 = time.perf_counter()
    res = stream_perplexity(model, ctx.eval_ids(), context=ctx.s.eval_context, progress=ctx.progress)
    return {"ppl": res.ppl, "nll": res.nll, "tokens": res.tokens, "seconds": time.perf_counter() - t0}


def compute_row(row: LMRow, ctx: _Context) -> dict[str, Any]:
    """Build, evaluate, train and re-evaluate one row (its training resumes from saved states)."""
    from lqmod.bench.memory import resident_bytes, rss_peak_meter
    from lqmod.train import train_causal_lm
    from lqmod.train.state import latest_state

    s = ctx.s
    fp = row_fingerprint(row, s)
    notes: list[str] = []
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    build: dict[str, Any] = {}
    if row.kind == "fp-lora":
        model = _fp_lora(ctx, notes)
    elif row.kind == "bnb":
        model = _bnb(row, ctx, notes)
    else:
        model, build = _quantized(row, ctx, notes)
    build_seconds = time.perf_counter() - t0
    bits, n_params = storage_bits(model)
    run_dir = ctx.cache / "runs" / f"{row.name}-{fp[:16]}"
    before_file = run_dir / "before.json"
    # An interrupted row resumes from its newest training state (and its stored "before").
    before = _read_json(before_file) if latest_state(run_dir) is not None else None
    resume = before is not None
    if before is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        before = _perplexity(model, ctx)
        _atomic_write(before_file, _dump(before))
    cfg = _train_config(s)
    train = ctx.train()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with rss_peak_meter() as rss:
        result = train_causal_lm(model, train, cfg, run_dir=run_dir, resume=resume, progress=ctx.progress)
    train_seconds = time.perf_counter() - t0
    if result.resumed_from:
        notes.append(f"training resumed from step {result.resumed_from}; tokens/s covers the resumed steps only")
    after = _perplexity(model, ctx)
    return {
        "row": row.name,
        "status": "ok",
        "fingerprint": fp,
        "description": row.description,
        "spec": row.spec(),
        "bits_per_param": bits,
        "quantized_params": n_params,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "resident_bytes": resident_bytes(model),
        "ppl_before": before["ppl"],
        "ppl_after": after["ppl"],
        "eval": {"before": before, "after": after},
        "loss": list(result.losses),
        "train_tokens": cfg.tokens_per_step * cfg.steps,
        "tokens_per_s": result.tokens_per_s,
        "peak_rss_delta_bytes": rss["delta"],
        # tokens/s depends on the machine's load: the other processes sharing its cores
        "torch_threads": torch.get_num_threads(),
        "load_average": {"before_training": list(load_before), "after_training": list(os.getloadavg())},
        "build": build,
        "seconds": {"build": build_seconds, "train": train_seconds, "total": time.perf_counter() - t_start},
        "notes": notes,
        "lqmod_version": _lqmod_version(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
