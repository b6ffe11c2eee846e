"""Real text, split into disjoint calibration / evaluation / training parts, and the
per-layer activation statistics captured from it with forward hooks.

* Encoders (MiniLM): WikiText-2 sentences, de-duplicated and shuffled with the seed, then cut
  into consecutive, non-overlapping slices: calibration, held-out evaluation, training.
* Causal LMs: the WikiText-2 raw test text tokenised once. Evaluation takes the first
  tokens (the perplexity protocol of ``shared/data/README.md``, at a shorter context), and
  calibration and training windows come from later, non-overlapping token ranges.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "SentenceSplits",
    "TokenSplits",
    "capture_grams",
    "describe_splits",
    "sentence_splits",
    "token_splits",
    "wikitext_raw_text",
]


@dataclass(frozen=True)
class SentenceSplits:
    calib: list[str]
    eval: list[str]
    train: list[str]


@dataclass(frozen=True)
class TokenSplits:
    """Token windows, each (n, length): eval at ``eval_ctx``, the others at ``ctx``."""

    calib: torch.Tensor
    eval: torch.Tensor
    train: torch.Tensor


def sentence_splits(
    sentences: Sequence[str], n_calib: int, n_eval: int, n_train: int, *, seed: int = 0
) -> SentenceSplits:
    """Disjoint slices of the de-duplicated, seed-shuffled sentences (exact strings never repeat)."""
    unique = list(dict.fromkeys(s.strip() for s in sentences if s.strip()))
    random.Random(seed).shuffle(unique)
    need = n_calib + n_eval + n_train
    if len(unique) < need:
        raise ValueError(f"asked for {need} distinct sentences, only {len(unique)} available")
    return SentenceSplits(
        calib=unique[:n_calib],
        eval=unique[n_calib : n_calib + n_eval],
        train=unique[n_calib + n_eval : need],
    )


def wikitext_raw_text() -> str:
    """The WikiText-2 raw test split as one string (raises DataNotFoundError without data)."""
    from lqmod.data import data_dir

    return (data_dir("wikitext-2-raw/wiki.test.raw") / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")


def token_splits(
    ids: torch.Tensor, *, n_calib: int, n_eval: int, n_train: int, ctx: int, eval_ctx: int, seed: int = 0
) -> TokenSplits:
    """Windows cut from one token stream: eval first, then calibration, then training.

    Training windows are drawn in a seed-shuffled order from the token range after the
    calibration windows, so no token is in two splits.
    """
    ids = ids.reshape(-1)
    eval_end = n_eval * eval_ctx
    calib_end = eval_end + n_calib * ctx
    rest = (ids.numel() - calib_end) // ctx
    if rest < n_train or (eval_end == 0 and n_eval):
        raise ValueError(f"text has {ids.numel()} tokens: too few for the requested windows")
    order = list(range(rest))
    random.Random(seed).shuffle(order)
    train = (
        torch.stack([ids[calib_end + i * ctx : calib_end + (i + 1) * ctx] for i in order[:n_train]])
        if n_train
        else ids.new_zeros(0, ctx)
    )
    return TokenSplits(
        calib=ids[eval_end:calib_end].view(n_calib, ctx),
        eval=ids[:eval_end].view(n_eval, eval_ctx),
        train=train,
    )


@torch.inference_mode()
def capture_grams(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[dict[str, Any]],
    *,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``X^T X`` (float64) and token counts of each named module's input over ``batches``.

    Each batch is the keyword arguments of one forward call; an ``attention_mask`` in it
    selects which positions count, so padding never enters the statistics. Modules fed the
    same tensor (q/k/v, gate/up) share one product per batch. The work is done by the core's
    :class:`lqmod.calibration.HessianAccumulator`; this keeps the benchmark's (grams, counts) shape.
    """
    from lqmod.calibration.hessian import HessianAccumulator

    acc = HessianAccumulator({n: model.get_submodule(n) for n in names})
    with acc.attach():
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress, leave=False):
            mask = batch.get("attention_mask")
            acc.start_batch(mask if isinstance(mask, torch.Tensor) else None)
            model(**batch)
    return dict(acc.grams), dict(acc.counts)


WIKITEXT = "WikiText-2 raw (wiki.test.raw), CC BY-SA 3.0, Merity et al. 2016"


def describe_splits(splits: SentenceSplits | TokenSplits, kind: str) -> dict[str, Any]:
    """What text each split holds, for the JSON report (source, licence, sizes)."""
    if isinstance(splits, TokenSplits):
        return {
            "source": WIKITEXT,
            "protocol": "eval: first n_eval*eval_ctx tokens; calibration and training: later, disjoint windows",
            "calib_windows": list(splits.calib.shape),
            "eval_windows": list(splits.eval.shape),
            "train_windows": list(splits.train.shape),
        }
    return {
        "source": WIKITEXT + " (sentences split from paragraphs, de-duplicated, shuffled by seed)",
        "calib_sentences": len(splits.calib),
        "eval_sentences": len(splits.eval),
        "train_sentences": len(splits.train),
    }
