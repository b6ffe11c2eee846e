"""The run: compute the rows without a current result, and gather every row file into the summary."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lqmod.bench.finetune_lm.compute import compute_row
from lqmod.bench.finetune_lm.context import _Context
from lqmod.bench.finetune_lm.fingerprints import RESULTS_VERSION, row_fingerprint
from lqmod.bench.finetune_lm.report import write_outputs
from lqmod.bench.finetune_lm.rows import ROWS, LMRow
from lqmod.bench.finetune_lm.settings import LMBenchSettings
from lqmod.bench.finetune_lm.store import _atomic_write, _dump, _lqmod_version, _read_json, _row_file, default_cache_dir


@dataclass
class BenchRun:
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def run_benchmark(
    settings: LMBenchSettings,
    out: str | os.PathLike[str],
    *,
    rows: Sequence[LMRow] | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> BenchRun:
    """Compute the rows that lack a current result under ``out``, then rewrite the summary files."""
    out = Path(out)
    log = log or _print
    cache_dir = Path(cache) if cache is not None else default_cache_dir()
    chosen = list(ROWS if rows is None else rows)
    ctx = _Context(settings, cache_dir, progress)
    run = BenchRun()
    for row in chosen:
        path = _row_file(out, row.name)
        old = _read_json(path)
        if old is not None and old.get("status") == "ok" and old.get("fingerprint") == row_fingerprint(row, settings):
            run.reused.append(row.name)
            continue
        log(f"[finetune_lm] row {row.name}: computing ({row.description})")
        try:
            res = compute_row(row, ctx)
        except (ImportError, RuntimeError, ValueError) as exc:
            # The row is recorded as failed (a rerun retries it); the others still run.
            res = {"row": row.name, "status": "failed", "fingerprint": row_fingerprint(row, settings),
                   "spec": row.spec(), "description": row.description, "reason": f"{type(exc).__name__}: {exc}"}
            run.failed.append(row.name)
            log(f"[finetune_lm] row {row.name}: FAILED {res['reason']}")
        else:
            run.computed.append(row.name)
            log(f"[finetune_lm] row {row.name}: ppl {res['ppl_before']:.2f} -> {res['ppl_after']:.2f}, "
                f"{res['bits_per_param']:.3f} bits/param, {res['tokens_per_s']:.0f} tokens/s, "
                f"{res['seconds']['total']:.0f} s")
        _atomic_write(path, _dump(res))
        # The summary is refreshed after every row, so an interrupted run still leaves a table.
        run.results = aggregate(settings, out)
        run.paths = write_outputs(run.results, out, plots=plots)
    run.results = aggregate(settings, out)
    run.paths = write_outputs(run.results, out, plots=plots)
    return run


def _print(msg: str) -> None:
    print(msg, flush=True)


def aggregate(settings: LMBenchSettings, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Every row file under ``out`` that belongs to ``settings`` (others are listed as stale)."""
    out = Path(out)
    rows: list[dict[str, Any]] = []
    stale: list[str] = []
    for row in ROWS:
        data = _read_json(_row_file(out, row.name))
        if data is None:
            continue
        if data.get("fingerprint") != row_fingerprint(row, settings):
            stale.append(row.name)
            continue
        rows.append(data)
    done = {r["row"] for r in rows if r["status"] == "ok"}
    missing = [r.name for r in ROWS if r.name not in done]
    return {
        "benchmark": "finetune_lm",
        "results_version": RESULTS_VERSION,
        "lqmod_version": _lqmod_version(),
        "settings": settings.describe(),
        "settings_fingerprint": settings.fingerprint(),
        "protocol": {
            "train": f"{settings.steps} steps x {settings.micro_batch} windows x {settings.seq_len} tokens of "
            f"{settings.train_text} (packed, seed {settings.seed}), AdamW lr {settings.lr}, cosine, "
            f"{settings.warmup} warmup steps, "
            f"grad clip 1.0, fp32; LoRA r={settings.rank} alpha={settings.alpha} on every linear but the LM head",
            "eval": f"stream_perplexity on the first {settings.eval_tokens} tokens of {settings.eval_text}, "
            f"disjoint windows of {settings.eval_context}",
            "calibration": f"{settings.calib_windows} windows of {settings.calib_len} tokens of "
            f"{settings.calib_text} (lqmod.calibration.text: the WikiText-2 validation split); "
            + ("natural X^T X" if settings.sink_share is None else
               f"each window's first token (attention sink) re-weighted to {settings.sink_share:g} of every "
               "Hessian's trace (lqmod.calibration.SinkWeighting)"),
            "memory": "peak RSS growth (VmHWM after a reset) during training, over the resident model: "
            "activations, gradients, optimizer state, materialized weights; allocator dependent",
        },
        "partial": bool(missing),
        "missing": missing,
        "stale": stale,
        "rows": rows,
    }
