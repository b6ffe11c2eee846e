"""Calibration batches from real text: padded sentence batches for encoders, fixed-length
token windows for causal LMs (the GPTQ protocol: random-free, consecutive windows of one
tokenised corpus)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["text_batches", "token_windows"]


def text_batches(
    tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenised, padded, truncated batches of ``texts``; each is one forward's keyword arguments."""
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no non-empty text to calibrate on")
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out.append({k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)})
    return out


def token_windows(
    tokenizer: Any, text: str, *, n: int, length: int, offset: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n`` consecutive, non-overlapping windows of ``length`` tokens of ``text``, from token ``offset``.

    Each window is its own batch ``{"input_ids": (1, length), "attention_mask": ones}``.
    """
    if n < 1 or length < 2 or offset < 0:
        raise ValueError(f"need n >= 1, length >= 2 and offset >= 0, got n={n}, length={length}, offset={offset}")
    ids = torch.as_tensor(tokenizer(text, return_tensors="pt")["input_ids"]).reshape(-1)
    need = offset + n * length
    if ids.numel() < need:
        raise ValueError(
            f"text has {ids.numel()} tokens, fewer than offset + n * length = {need}; use fewer or shorter windows"
        )
    windows = ids[offset:need].view(n, length)
    ones = torch.ones(1, length, dtype=torch.long)
    return [{"input_ids": w.unsqueeze(0).clone(), "attention_mask": ones.clone()} for w in windows]
