"""The settings that change a row's numbers: :class:`LMBenchSettings`, :data:`FULL`, :data:`QUICK`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from lqmod.bench.finetune_lm.store import _digest


@dataclass(frozen=True)
class LMBenchSettings:
    """Everything that changes a row's numbers (all of it goes into the row fingerprints)."""

    model: str = "smollm2"
    train_text: str = "wikitext2-valid"  # lqmod.train.data source: the WikiText-2 validation split
    eval_text: str = "wikitext2"  # lqmod.train.data source: the WikiText-2 *raw test* split
    calib_text: str = "wikitext2"  # lqmod.calibration.text source: the WikiText-2 validation split
    eval_tokens: int = 2048
    eval_context: int = 256
    calib_windows: int = 32
    calib_len: int = 256
    steps: int = 12
    micro_batch: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    # No warmup: transformers' warmup gives step 0 a learning rate of 0, a twelfth of this budget.
    warmup: int = 0
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    lq_iters: int = 10  # lq-lora alternations (quantize, low-rank fit); its tolerance stops it earlier
    optq_group: int = 64
    # The first token of each calibration window (the attention sink) carries this share of every
    # Hessian's trace: OPTQ-3 loses to NF3 on SmolLM2 without it (lqmod.calibration.sinks).
    sink_share: float | None = 0.5
    plan_error: str = "output"  # error measure of the plans' tables (falls back to frobenius if absent)
    name: str = "full"

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        keep = {k: v for k, v in asdict(self).items() if k != "name"}
        return _digest(keep)


FULL = LMBenchSettings()
# Tiny settings for tests and smoke runs (meant for a tiny model, seconds per row).
QUICK = replace(
    FULL, eval_tokens=384, eval_context=64, calib_windows=4, calib_len=32, steps=3, micro_batch=2, seq_len=32,
    lr=1e-2, rank=4, alpha=8.0, lq_iters=2, name="quick",
)  # fmt: skip
