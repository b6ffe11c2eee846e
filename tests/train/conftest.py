"""Fixtures for the training tests: a tiny lqmod-quantized Llama (tokenizer: tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def quantized_llama(tiny_llama: torch.nn.Module) -> torch.nn.Module:
    from lqmod.model import quantize_model

    quantize_model(tiny_llama, "nf", {"bits": 4, "blocksize": 32}, lora={"r": 4, "alpha": 8, "dropout": 0.1},
                   progress=False)
    return tiny_llama
