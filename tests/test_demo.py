"""The README's demos, shortened: real MiniLM and SmolLM2 weights, real WikiText-2 text."""

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


@pytest.mark.slow
def test_lm_demo_runs_and_finetuning_lowers_perplexity() -> None:
    from lqmod.hf import resolve_model

    try:
        data_dir("wikitext-2/valid.txt")
        resolve_model("smollm2")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from lqmod.demo_lm import run_lm_demo

    result = run_lm_demo(steps=3, batch_size=2, seq_len=64, eval_tokens=512, context=128, lr=3e-3,
                         console=Console(width=120), progress=False)
    # 3-bit NF costs perplexity against fp32; a few adapter steps on other WikiText text win some back.
    assert result.ppl_fp < result.ppl_before
    assert result.ppl_after < result.ppl_before
    assert result.reload_identical
