"""Packing, prompt masking and text sources of the causal-LM training data."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from lqmod.train.data import IGNORE_INDEX, Record, pack_records, read_records, tokenize_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def _ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
    return ids


def test_packing_concatenates_records_with_eos_and_drops_the_remainder(word_tokenizer: PreTrainedTokenizerFast) -> None:
    recs = [Record("the quick brown fox"), Record("the lazy dog ."), Record("a small adapter")]
    eos = word_tokenizer.eos_token_id
    stream = [t for r in recs for t in [*_ids(word_tokenizer, r.text), eos]]
    packed = pack_records(word_tokenizer, recs, 5)
    assert len(stream) == 14
    assert packed.input_ids.shape == (2, 5)  # 14 tokens -> two windows, 4 dropped
    assert packed.input_ids.flatten().tolist() == stream[:10]
    assert torch.equal(packed.labels, packed.input_ids)  # plain text: every token is scored
    assert (packed.input_ids == eos).sum() == 2  # records are separated, never padded


def test_prompt_tokens_are_masked_out_of_the_loss(word_tokenizer: PreTrainedTokenizerFast) -> None:
    recs = [Record("the dog sleeps", prompt="the quick brown fox"), Record("a small adapter .")]
    ids, labels = tokenize_records(word_tokenizer, recs)
    n_prompt = len(_ids(word_tokenizer, "the quick brown fox"))
    assert labels[:n_prompt].tolist() == [IGNORE_INDEX] * n_prompt
    assert torch.equal(labels[n_prompt:], ids[n_prompt:])
    packed = pack_records(word_tokenizer, recs, 4)
    assert packed.describe()["scored_tokens"] == int((packed.labels != IGNORE_INDEX).sum()) < packed.n_tokens


def test_jsonl_records(tmp_path: Path, word_tokenizer: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": "the quick brown fox", "completion": "jumps over the lazy dog ."}, {"text": "the dog sleeps"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = read_records(str(path))
    assert recs == [Record("jumps over the lazy dog .", "the quick brown fox"), Record("the dog sleeps")]
    packed = pack_records(word_tokenizer, str(path), 3)
    assert packed.source == str(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"prompt": "a"}', "needs a string 'text', or string 'prompt' and 'completion'"),
        ('{"text": 3}', "got keys ['text']"),
    ],
)
def test_bad_jsonl_records_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{re.escape(message)}"):
        read_records(str(path))


def test_unknown_source_and_too_little_text(word_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"neither a corpus .*wikitext2.* nor a file"):
        pack_records(word_tokenizer, "no-such-corpus", 8)
    small = tmp_path / "small.txt"
    small.write_text("the dog")
    with pytest.raises(ValueError, match="fewer than one window of 64"):
        pack_records(word_tokenizer, str(small), 64)


def test_named_corpora_are_disjoint_splits() -> None:
    from lqmod.train.data import source_text

    try:
        valid, test = source_text("wikitext2-valid"), source_text("wikitext2")
    except FileNotFoundError as exc:
        pytest.skip(f"data folder unavailable: {exc}")
    assert " @-@ " not in valid  # WikiText's tokenisation is undone for training text
    probe = next(ln for ln in test.splitlines() if len(ln) > 200)[:200]
    assert probe in test and probe not in valid
