"""Named calibration texts, read through :mod:`lqmod.data` (local files only), turned into batches.

``wikitext2`` is the WikiText-2 *validation* split (``shared/data/wikitext-2/valid.txt``, the
data README's calibration text): disjoint from the raw *test* split that perplexity is
measured on. ``ptb`` is the Penn Treebank validation split. Anything else is read as a
path to a UTF-8 file (one paragraph per line).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lqmod.calibration.batches import text_batches, token_windows

__all__ = ["TEXT_SOURCES", "calibration_batches", "calibration_paragraphs", "sentences"]

TEXT_SOURCES = ("wikitext2", "ptb")


def _detokenize(line: str) -> str:
    # WikiText's tokenisation: " @-@ " joins hyphenated words; spaces before punctuation.
    line = re.sub(r" @(.)@ ", r"\1", line)
    line = re.sub(r" ([.,;:!?)'])", r"\1", line)
    return re.sub(r"\( ", "(", line).strip()


def calibration_paragraphs(source: str) -> list[str]:
    """Paragraphs of a named text (``wikitext2``, ``ptb``) or of a UTF-8 file."""
    from lqmod.data import data_dir

    if source == "wikitext2":
        path = data_dir("wikitext-2/valid.txt") / "wikitext-2" / "valid.txt"
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.strip().startswith("=")]
    elif source == "ptb":
        path = data_dir("ptb/ptb.valid.txt") / "ptb" / "ptb.valid.txt"
        lines = path.read_text(encoding="utf-8").splitlines()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"calibration text {source!r} is neither a known name ({', '.join(TEXT_SOURCES)}) nor a file"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
    paragraphs = [_detokenize(ln) for ln in lines if len(ln.split()) >= 4]
    if not paragraphs:
        raise ValueError(f"calibration text {source!r} has no line of 4 or more words")
    return paragraphs


def sentences(paragraphs: list[str], *, min_words: int = 6, max_words: int = 64) -> list[str]:
    """Sentences in reading order, so neighbours mostly come from the same paragraph."""
    out = []
    for para in paragraphs:
        for sent in re.split(r"(?<=[.!?]) (?=[A-Z\"])", para):
            if min_words <= len(sent.split()) <= max_words:
                out.append(sent.strip())
    return out


def calibration_batches(
    tokenizer: Any,
    model_kind: str,
    source: str,
    n: int,
    *,
    length: int = 256,
    batch_size: int = 8,
    offset: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``n`` calibration examples of ``source``: token windows of ``length`` for a causal LM,
    else the first ``n`` sentences (from ``offset``) in padded batches of ``batch_size``.

    Sentences stay in reading order so that rows (0, 1), (2, 3) ... of a batch are adjacent
    sentences, the positive pairs of :func:`lqmod.calibration.sentence_contrastive_loss`.
    """
    if n < 1:
        raise ValueError(f"the number of calibration examples must be >= 1, got {n}")
    paragraphs = calibration_paragraphs(source)
    if model_kind == "causal-lm":
        return token_windows(tokenizer, "\n\n".join(paragraphs), n=n, length=length, offset=offset)
    sents = sentences(paragraphs)[offset : offset + n]
    if len(sents) < n:
        raise ValueError(f"calibration text {source!r} has only {len(sents)} sentences from offset {offset}, asked {n}")
    return text_batches(tokenizer, sents, batch_size=batch_size, max_length=min(length, 128))
