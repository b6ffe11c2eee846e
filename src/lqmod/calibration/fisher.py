"""Diagonal empirical Fisher of weight matrices, and the self-supervised losses it is taken of.

The diagonal empirical Fisher of a weight ``W`` is ``F = E_x[(d loss(x) / dW)^2]``, the mean
over *examples* of the squared per-example gradient (LQ-LoRA weights its quantization error
by it). Squaring the gradient of a whole batch instead gives ``(E_x g)^2``, which lets
per-example gradients of opposite sign cancel: it underestimates ``F`` and changes which
weights look important. Hence ``per_example=True`` (the default) takes one gradient per
example.

Losses return one value per example, shape ``(n,)``, so a batch needs one forward pass:

* :func:`causal_lm_loss` — next-token cross-entropy averaged over each sequence's real
  (non-padding) targets; an example is a sequence.
* :func:`sentence_contrastive_loss` — for encoders without an LM head (all-MiniLM-L6-v2):
  the in-batch contrastive objective all-MiniLM was trained with (sentence-transformers'
  MultipleNegativesRankingLoss: cosine similarity of mean-pooled, normalised embeddings,
  scale 20, cross-entropy against the other positives in the batch). Rows ``2i`` and
  ``2i+1`` of a batch form a pair; with real text, adjacent sentences of one paragraph are
  the positives (a topical-coherence signal, the same kind of weak supervision as the
  title/body and neighbouring-sentence pairs in all-MiniLM's training data). An example is
  a pair; its loss involves the other pairs as negatives, so a batch needs at least two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lqmod.calibration.hessian import linear_module
from lqmod.types import LayerStats

__all__ = [
    "CONTRASTIVE_SCALE",
    "LossFn",
    "causal_lm_loss",
    "default_loss",
    "diagonal_fisher",
    "fisher_stats",
    "has_lm_head",
    "mean_pooled_embeddings",
    "sentence_contrastive_loss",
]

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]

CONTRASTIVE_SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default


def causal_lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy, shape (batch,), padding left out.

    A target position counts when both it and the token predicting it are real
    (``attention_mask`` 1); a sequence with no such position contributes 0.
    """
    ids = batch["input_ids"]
    logits = model(**batch).logits[:, :-1].float()
    targets = ids[:, 1:]
    mask = batch.get("attention_mask")
    valid = torch.ones_like(targets, dtype=torch.bool) if mask is None else (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.view_as(targets) * valid
    return nll.sum(1) / valid.sum(1).clamp(min=1)


def mean_pooled_embeddings(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """L2-normalised mean of the last hidden states over real tokens (sentence-transformers' pooling)."""
    hidden = model(**batch).last_hidden_state
    mask = batch.get("attention_mask")
    m = torch.ones(hidden.shape[:2], dtype=hidden.dtype) if mask is None else mask.to(hidden.dtype)
    pooled = (hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def sentence_contrastive_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Per-pair in-batch contrastive loss, shape (batch // 2,): rows (0,1), (2,3) ... are pairs.

    ``loss_i = -log softmax_j(20 * cos(a_i, p_j))[i]`` with anchors ``a = emb[0::2]`` and
    positives ``p = emb[1::2]`` (an odd last row is dropped). Needs at least two pairs.
    """
    emb = mean_pooled_embeddings(model, batch)
    n = emb.shape[0] // 2
    if n < 2:
        raise ValueError(
            f"sentence_contrastive_loss needs at least 4 texts per batch (2 pairs of adjacent texts), got "
            f"{emb.shape[0]}: the other pairs are the negatives"
        )
    anchors, positives = emb[0 : 2 * n : 2], emb[1 : 2 * n : 2]
    scores = CONTRASTIVE_SCALE * anchors @ positives.T
    return F.cross_entropy(scores.float(), torch.arange(n, device=scores.device), reduction="none")


def has_lm_head(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


def default_loss(model: nn.Module) -> LossFn:
    """Causal LM loss for a model with an LM head, else the sentence contrastive loss."""
    return causal_lm_loss if has_lm_head(model) else sentence_contrastive_loss


def _weight(module: nn.Module) -> nn.Parameter:
    weight = module.weight
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"{type(module).__name__} has no weight parameter to take a Fisher of")
    return weight


def diagonal_fisher(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Mapping[str, Any]],
    loss_fn: LossFn | None = None,
    *,
    per_example: bool = True,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of each named module's weight, float32, shaped (out, in).

    ``loss_fn(model, batch)`` returns the loss of each example, shape ``(n,)`` (or a scalar:
    one example); ``None`` picks :func:`causal_lm_loss` for models with an LM head and
    :func:`sentence_contrastive_loss` otherwise. With ``per_example=True`` every example's
    gradient is squared separately (the true empirical Fisher, as LQ-LoRA computes it: the
    square of a batch-mean gradient lets examples' gradients cancel and underestimates it);
    ``per_example=False`` squares the gradient of each batch's mean loss instead (cheaper,
    one backward per batch, counted as one example). The result is the mean over examples.
    A Conv1D's (in, out) gradient is transposed to (out, in). The model's ``requires_grad``
    flags, ``.grad`` fields and train/eval mode are left as they were (gradients are taken
    with :func:`torch.autograd.grad`, dropout is off while measuring).
    """
    loss_fn = loss_fn or default_loss(model)
    modules = {n: linear_module(model, n) for n in names}
    weights = {n: _weight(m) for n, m in modules.items()}
    transposed = {n: not isinstance(m, nn.Linear) for n, m in modules.items()}
    params = list(weights.values())
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    sums = {n: torch.zeros(w.t().shape if transposed[n] else w.shape, dtype=torch.float32) for n, w in weights.items()}
    count = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            for batch in tqdm(batches, desc="fisher", unit="batch", disable=not progress, leave=False):
                losses = loss_fn(model, batch)
                if losses.ndim > 1:
                    raise ValueError(f"loss_fn must return a scalar or one loss per example, got {tuple(losses.shape)}")
                terms = list(losses.reshape(-1)) if per_example else [losses.mean()]
                for i, term in enumerate(terms):
                    grads = torch.autograd.grad(term, params, retain_graph=i < len(terms) - 1, allow_unused=True)
                    for name, g in zip(weights, grads, strict=True):
                        if g is not None:
                            g = g.detach().float()
                            sums[name] += (g.t() if transposed[name] else g).square().cpu()
                    count += 1
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        model.train(was_training)
    if count == 0:
        raise ValueError("diagonal_fisher got no examples: give at least one non-empty batch")
    return {n: s / count for n, s in sums.items()}


def fisher_stats(
    fisher: Mapping[str, torch.Tensor], stats: Mapping[str, LayerStats] | None = None
) -> dict[str, LayerStats]:
    """Merge Fisher diagonals into :class:`LayerStats` (new objects; ``stats`` is not modified)."""
    out = {n: LayerStats(s.hessian, s.n_tokens, s.fisher, s.act_absmean) for n, s in (stats or {}).items()}
    for name, f in fisher.items():
        base = out.get(name) or LayerStats()
        base.fisher = f
        out[name] = base
    return out
