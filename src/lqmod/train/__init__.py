"""Finetuning: the causal-LM loop (packed data, schedules, accumulation, evaluation,
resumable state) and the encoder embedding-distillation loop used by the MiniLM demo.

``lqmod.train`` trains the adapters of an lqmod-quantized model; the same model also trains
unchanged under ``transformers.Trainer`` or TRL (see ``docs/training.md``).
"""

from lqmod.train.config import FinetuneConfig
from lqmod.train.data import CORPORA, PackedData, Record, pack_records, read_records, source_text
from lqmod.train.distill import (
    TrainConfig,
    TrainResult,
    distill_loss,
    embed,
    embedding_fidelity,
    finetune,
)
from lqmod.train.loop import FinetuneResult, StepInfo, step_windows, train_causal_lm

__all__ = [
    "CORPORA",
    "FinetuneConfig",
    "FinetuneResult",
    "PackedData",
    "Record",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "distill_loss",
    "embed",
    "embedding_fidelity",
    "finetune",
    "pack_records",
    "read_records",
    "source_text",
    "step_windows",
    "train_causal_lm",
]
