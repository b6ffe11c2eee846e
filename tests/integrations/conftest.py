"""Fixtures for the transformers/PEFT integration tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tokens() -> torch.Tensor:
    # 2 x 5 tokens: no activation has a weight's (64, 64) or (64, 128) shape.
    return torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(3))
