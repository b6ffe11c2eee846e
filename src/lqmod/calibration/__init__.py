"""Calibration statistics: Hessians (``X^T X``), diagonal Fisher, activation means; an on-disk
cache for them; real-text calibration batches; and GPTQ-style sequential quantization.

Quantizers declare what they need in ``QuantizerSpec.needs`` (``"hessian"``, ``"fisher"``);
this package computes it from real text, once, and the core passes it to them as
:class:`lqmod.types.LayerStats`. Nothing here names a quantizer.
"""

from __future__ import annotations

from lqmod.calibration.batches import text_batches, token_windows
from lqmod.calibration.cache import StatsCache, default_cache_root
from lqmod.calibration.fisher import (
    causal_lm_loss,
    default_loss,
    diagonal_fisher,
    fisher_stats,
    mean_pooled_embeddings,
    sentence_contrastive_loss,
)
from lqmod.calibration.hessian import HessianAccumulator, collect_hessians
from lqmod.calibration.sequential import find_blocks, quantize_model_sequential
from lqmod.calibration.sinks import SinkWeighting

__all__ = [
    "HessianAccumulator",
    "SinkWeighting",
    "StatsCache",
    "causal_lm_loss",
    "collect_hessians",
    "default_cache_root",
    "default_loss",
    "diagonal_fisher",
    "find_blocks",
    "fisher_stats",
    "mean_pooled_embeddings",
    "quantize_model_sequential",
    "sentence_contrastive_loss",
    "text_batches",
    "token_windows",
]
