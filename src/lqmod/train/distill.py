"""Embedding distillation for encoders: match an unquantized teacher's sentence
embeddings (loss = 1 - cosine) on real sentences, and the fidelity measure it reports.

Causal LMs train with :func:`lqmod.train.train_causal_lm` instead.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from lqmod.config import FrozenModel
from lqmod.model import lora_parameters

__all__ = [
    "TrainConfig",
    "TrainResult",
    "distill_loss",
    "embed",
    "embedding_fidelity",
    "finetune",
]


class TrainConfig(FrozenModel):
    steps: int = Field(50, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(64, ge=8)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)

    @property
    def first(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def last(self) -> float:
        tail = self.losses[-5:]
        return sum(tail) / len(tail) if tail else math.nan


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.normalize(pooled, dim=-1)


def distill_loss(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        target = embed(teacher, batch)
    return (1 - (embed(student, batch) * target).sum(-1)).mean()


def _batches(tokenizer: Any, texts: Sequence[str], cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    rng = random.Random(cfg.seed)
    order = list(range(len(texts)))
    out: list[dict[str, torch.Tensor]] = []
    while len(out) < cfg.steps:
        rng.shuffle(order)
        for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            chunk = [texts[j] for j in order[i : i + cfg.batch_size]]
            out.append(
                dict(tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_length))
            )
            if len(out) == cfg.steps:
                break
    return out


def finetune(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    cfg: TrainConfig | None = None,
    *,
    progress: bool = True,
) -> TrainResult:
    """AdamW on the adapters for ``cfg.steps`` batches of ``texts``."""
    cfg = cfg or TrainConfig()
    if len(texts) < cfg.batch_size:
        raise ValueError(f"need at least batch_size={cfg.batch_size} texts to train on, got {len(texts)}")
    params = lora_parameters(model)
    if not params:
        raise ValueError("model has no trainable adapter parameters: quantize it with lqmod first")
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = TrainResult()
    model.train()
    bar = tqdm(_batches(tokenizer, texts, cfg), desc="finetuning", unit="step", disable=not progress)
    for batch in bar:
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
    model.eval()
    return result


@torch.no_grad()
def embedding_fidelity(
    student: nn.Module, teacher: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 64
) -> float:
    """Mean cosine similarity of the student's sentence embeddings to the teacher's."""
    total, n = 0.0, 0
    for i in range(0, len(sentences), batch_size):
        batch = dict(tokenizer(list(sentences[i : i + batch_size]), return_tensors="pt", padding=True,
                               truncation=True, max_length=128))
        sims = (embed(student, batch) * embed(teacher, batch)).sum(-1)
        total += float(sims.sum())
        n += sims.numel()
    return total / max(n, 1)
