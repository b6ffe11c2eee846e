"""End-model fidelity: what a quantized model still does, on held-out real text.

* encoders: mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe
  for all-MiniLM-L6-v2), compared by cosine similarity with the unquantized model's;
* causal LMs: perplexity over non-overlapping windows (loss on every token but the first).

Rows are evaluated by swapping dequantized weights into the one fp32 model
(:func:`swapped_weights`), so every method is measured through the same forward code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "encode_batches",
    "mean_pool",
    "perplexity",
    "sentence_embeddings",
    "swapped_weights",
]


@contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace the ``.weight`` of the named linear layers (restored on exit)."""
    saved: dict[str, torch.Tensor] = {}
    try:
        for name, w in weights.items():
            weight = _weight(model, name)
            saved[name] = weight.data
            weight.data = w.to(saved[name].dtype).reshape(saved[name].shape)
        yield
    finally:
        for name, w in saved.items():
            _weight(model, name).data = w


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    weight = model.get_submodule(name).weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} has no weight tensor")
    return weight


def encode_batches(
    tokenizer: Any, sentences: Sequence[str], *, batch_size: int = 32, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenised, padded batches (the keyword arguments of one encoder forward each)."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            list(sentences[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append(dict(enc))
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where ``mask`` is 1, then L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def sentence_embeddings(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], *, grad: bool = False
) -> torch.Tensor:
    """(n, hidden) normalised embeddings of every sentence in ``batches``."""
    with torch.set_grad_enabled(grad):
        embs = [mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches]
    return torch.cat(embs)


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = False) -> float:
    """exp(mean next-token NLL) over (n, ctx) windows, each scored on its last ctx-1 tokens.

    The same scoring as ``lqmod eval`` and the training loop's held-out loss
    (:func:`lqmod.evaluation.windows_loss`).
    """
    from lqmod.evaluation import windows_loss

    return windows_loss(model, windows, windows, batch_size=batch_size).ppl
