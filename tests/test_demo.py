"""The README's demo, shortened: real MiniLM weights, real WikiText-2 text."""

from __future__ import annotations

import pytest
from rich.console import Console

from lqmod.data import DataNotFoundError, data_dir


@pytest.mark.slow
def test_demo_runs_and_finetuning_recovers_fidelity(minilm_dir: str) -> None:
    try:
        data_dir("wikitext-2-raw/wiki.test.raw")
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    from lqmod.demo import run_demo

    result = run_demo(steps=12, n_eval=64, console=Console(width=120))
    assert 0.9 < result.fidelity_before < 1.0
    assert result.loss_after < result.loss_before
    assert result.fidelity_after > result.fidelity_before
    assert result.reload_identical
