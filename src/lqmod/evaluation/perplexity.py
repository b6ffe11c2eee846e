"""Perplexity and held-out loss of causal LMs: one implementation for the CLI, the training
loop and the benchmarks.

:func:`stream_perplexity` scores one token stream with a sliding window (transformers'
"perplexity of fixed-length models" recipe): windows of ``context`` tokens start every
``stride`` tokens and each token is scored once, by the first window that holds it with
some context before it. ``stride == context`` gives disjoint windows, whose first tokens
go unscored; a smaller stride gives every token but the very first at least
``context - stride`` tokens of context.

:func:`windows_loss` scores packed windows with labels (``-100`` = not scored), the
held-out loss of :mod:`lqmod.train`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["Perplexity", "stream_perplexity", "token_nll", "window_plan", "windows_loss"]


@dataclass(frozen=True)
class Perplexity:
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    context: int
    stride: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.tokens else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ppl": self.ppl}


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Scoring must not see dropout, and must hand the model back in the mode it came in.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def token_nll(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (float32) of ``labels`` given ``input_ids``, and the token count.

    Position ``t``'s label is predicted from positions ``< t``, as in transformers.
    """
    logits = model(input_ids=input_ids).logits[:, :-1]
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum")
    return nll, int((target != -100).sum())


def window_plan(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` for each window over ``n_tokens`` tokens."""
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    plan: list[tuple[int, int, int]] = []
    prev_end = 0
    begin = 0
    while prev_end < n_tokens:
        end = min(begin + context, n_tokens)
        first = max(begin + 1, prev_end)
        if first < end:
            plan.append((begin, end, first))
        prev_end = end
        begin += stride
    return plan


@torch.inference_mode()
def stream_perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    context: int = 256,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of ``model`` on one token stream ``ids`` (1-D)."""
    ids = ids.reshape(-1)
    stride = stride or context
    plan = window_plan(ids.numel(), context, stride)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    # Windows of the same length are batched; only the last one may be shorter.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in plan:
        groups.setdefault(w[1] - w[0], []).append(w)
    batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    with _eval_mode(model):
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
            x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
            labels = x.clone()
            for row, (b, _, first) in enumerate(batch):
                labels[row, : first - b] = -100
            nll, n = token_nll(model, x, labels)
            total += float(nll)
            count += n
    return Perplexity(total / max(count, 1), count, context, stride)


@torch.inference_mode()
def windows_loss(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 8
) -> Perplexity:
    """Mean NLL over every scored label of packed ``(n, seq_len)`` windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with _eval_mode(model):
        for i in range(0, input_ids.shape[0], batch_size):
            x, y = input_ids[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
            nll, n = token_nll(model, x, y)
            total += float(nll)
            count += n
    seq = int(input_ids.shape[1])
    return Perplexity(total / max(count, 1), count, seq, seq)
