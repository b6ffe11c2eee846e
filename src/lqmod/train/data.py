"""Causal-LM training and evaluation data: text sources, prompt masking, packing.

A *source* is one of

* a named corpus from the data folder (:mod:`lqmod.data`): ``wikitext2`` (the raw test
  split), ``wikitext2-valid`` (the tokenised validation split, lightly detokenised),
  ``ptb`` (test) and ``ptb-valid``;
* a ``.jsonl`` file of records ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``;
* any other UTF-8 text file, read as one document.

Records are tokenised without special tokens, joined with the EOS token and cut into
fixed-length windows (packing, as transformers' ``run_clm`` and TRL's ``packing=True`` do):
no padding, every position a real token. Prompt tokens keep their place in the window but
get the label ``-100``, so they condition the completion without entering the loss.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CORPORA",
    "IGNORE_INDEX",
    "PackedData",
    "Record",
    "pack_records",
    "read_records",
    "source_text",
    "tokenize_records",
]

IGNORE_INDEX = -100
# name -> (path inside the data folder, WikiText-style detokenisation)
CORPORA: dict[str, tuple[str, bool]] = {
    "wikitext2": ("wikitext-2-raw/wiki.test.raw", False),
    "wikitext2-valid": ("wikitext-2/valid.txt", True),
    "ptb": ("ptb/ptb.test.txt", False),
    "ptb-valid": ("ptb/ptb.valid.txt", False),
}


@dataclass(frozen=True)
class Record:
    """One training example: ``prompt`` (conditioning only, may be empty) then ``text``."""

    text: str
    prompt: str = ""


@dataclass(frozen=True)
class PackedData:
    """``(n, seq_len)`` token windows and their labels (``-100`` where not scored)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    def take(self, n: int) -> PackedData:
        """The first ``n`` windows (all of them if there are fewer)."""
        return PackedData(self.input_ids[:n], self.labels[:n], self.source)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "windows": len(self),
            "seq_len": self.seq_len,
            "tokens": self.n_tokens,
            "scored_tokens": int((self.labels != IGNORE_INDEX).sum()),
        }


def _detokenize_wikitext(line: str) -> str:
    line = re.sub(r" @(.)@ ", r"\1", line)
    line = re.sub(r" ([.,;:!?)'])", r"\1", line)
    return re.sub(r"\( ", "(", line)


def source_text(name: str) -> str:
    """The whole text of a named corpus or of a plain text file."""
    if name in CORPORA:
        from lqmod.data import data_dir

        rel, detok = CORPORA[name]
        text = (data_dir(rel) / rel).read_text(encoding="utf-8")
        return "\n".join(_detokenize_wikitext(ln) for ln in text.splitlines()) if detok else text
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"text source {name!r} is neither a corpus ({', '.join(CORPORA)}) nor a file "
            "(a UTF-8 text file, or .jsonl with 'text' or 'prompt'/'completion' records)"
        )
    return path.read_text(encoding="utf-8")


def _jsonl_records(path: Path) -> list[Record]:
    out: list[Record] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: a record must be a JSON object, got {type(row).__name__}")
        if isinstance(row.get("text"), str) and "completion" not in row:
            out.append(Record(row["text"]))
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            out.append(Record(row["completion"], row["prompt"]))
        else:
            raise ValueError(
                f"{path}:{i}: a record needs a string 'text', or string 'prompt' and 'completion'; "
                f"got keys {sorted(row)}"
            )
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def read_records(source: str) -> list[Record]:
    """The records of a source (see the module docstring for what a source is)."""
    path = Path(source)
    if source not in CORPORA and path.suffix == ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"JSONL file {source} not found")
        return _jsonl_records(path)
    return [Record(source_text(source))]


def tokenize_records(tokenizer: Any, records: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token stream for all records (EOS after each) and its labels."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, needed to separate packed records")
    ids: list[int] = []
    labels: list[int] = []
    for rec in records:
        prompt = tokenizer(rec.prompt, add_special_tokens=False)["input_ids"] if rec.prompt else []
        body = tokenizer(rec.text, add_special_tokens=False)["input_ids"] + [eos]
        ids += prompt + body
        labels += [IGNORE_INDEX] * len(prompt) + body
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def pack_records(
    tokenizer: Any,
    records: Iterable[Record] | str,
    seq_len: int,
    *,
    max_windows: int | None = None,
    source: str = "",
) -> PackedData:
    """Pack records (or a source name) into ``(n, seq_len)`` windows; the remainder is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 tokens, got {seq_len}")
    if isinstance(records, str):
        source = source or records
        records = read_records(records)
    ids, labels = tokenize_records(tokenizer, list(records))
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"text source {source or '<records>'} has {ids.numel()} tokens: fewer than one window of {seq_len}"
        )
    return PackedData(
        ids[: n * seq_len].view(n, seq_len).clone(),
        labels[: n * seq_len].view(n, seq_len).clone(),
        source,
    )
