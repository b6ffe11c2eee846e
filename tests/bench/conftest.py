"""Tiny random models saved as local transformers directories, for the ``lqmod bench`` mode smoke runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A 2-layer BERT (hidden 64; the benchmarks' 128-token sentences fit its positions)."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=101, max_position_embeddings=130)  # fmt: skip
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    word_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A 2-layer Llama (hidden 64) as a causal LM directory."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, max_position_embeddings=256)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    word_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def wikitext() -> None:
    """Skip where the WikiText-2 data the benchmarks read is absent."""
    from lqmod.data import DataNotFoundError, wikitext_sentences

    try:
        wikitext_sentences()
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
