"""Fixtures of the quip tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Many small matmuls per LDLQ block: on a shared, busy CPU several threads spin-wait on
    # each other and run far slower than one. Restored afterwards for other test folders.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
