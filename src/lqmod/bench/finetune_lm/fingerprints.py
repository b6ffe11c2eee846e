"""What a row's results and its cached quantized model are keyed by (change nothing here
without meaning to: the caches and the row files are found by these digests)."""

from __future__ import annotations

from lqmod.bench.finetune_lm.rows import LMRow
from lqmod.bench.finetune_lm.settings import LMBenchSettings
from lqmod.bench.finetune_lm.store import _digest

RESULTS_VERSION = 1


def row_fingerprint(row: LMRow, settings: LMBenchSettings) -> str:
    return _digest({"v": RESULTS_VERSION, "row": row.spec(), "settings": settings.fingerprint()})


def _quant_key(row: LMRow, s: LMBenchSettings) -> str:
    """What the quantized model (with its initial adapters) depends on: not the training settings."""
    used = {
        "model": s.model, "row": row.spec(), "rank": s.rank, "alpha": s.alpha, "seed": s.seed,
        "lq_iters": lq_iters(row, s) if row.initializer == "lq-lora" else None,
    }  # fmt: skip
    if row.calibration != "none":
        used.update(calib_text=s.calib_text, calib_windows=s.calib_windows, calib_len=s.calib_len,
                    sink_share=s.sink_share)
    if row.kind == "plan":
        used.update(plan_error=_plan_error(row, s))
    if row.quantizer == "optq" or row.kind == "plan":
        used.update(optq_group=s.optq_group)
    return _digest(used)


def _plan_error(row: LMRow, s: LMBenchSettings) -> str:
    return row.plan_error if row.plan_error is not None else s.plan_error


def lq_iters(row: LMRow, s: LMBenchSettings) -> int:
    """The lq-lora alternations of a row: the settings' count, capped by the row's own."""
    return s.lq_iters if row.lq_iters is None else min(row.lq_iters, s.lq_iters)
