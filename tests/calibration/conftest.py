"""Fixtures of the calibration tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture
def tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
        max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()
