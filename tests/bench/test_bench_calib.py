"""Text splits, activation capture with forward hooks, weight swapping, pooling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lqmod.bench.calib import capture_grams, sentence_splits, token_splits
from lqmod.bench.fidelity import mean_pool, swapped_weights


def test_sentence_splits_are_disjoint_deduplicated_and_seeded() -> None:
    sentences = [f"sentence {i}." for i in range(50)] + ["sentence 3."] * 5
    s = sentence_splits(sentences, 10, 20, 15, seed=1)
    assert (len(s.calib), len(s.eval), len(s.train)) == (10, 20, 15)
    assert not set(s.calib) & set(s.eval) and not set(s.eval) & set(s.train) and not set(s.calib) & set(s.train)
    assert sentence_splits(sentences, 10, 20, 15, seed=1) == s
    assert sentence_splits(sentences, 10, 20, 15, seed=2).calib != s.calib
    with pytest.raises(ValueError, match="distinct sentences"):
        sentence_splits(sentences, 30, 20, 1)


def test_token_splits_use_disjoint_ranges() -> None:
    ids = torch.arange(1000)
    s = token_splits(ids, n_calib=3, n_eval=2, n_train=4, ctx=50, eval_ctx=100, seed=0)
    assert s.eval.shape == (2, 100) and s.calib.shape == (3, 50) and s.train.shape == (4, 50)
    assert torch.equal(s.eval.reshape(-1), torch.arange(200))  # evaluation = the first tokens
    seen = torch.cat([s.eval.reshape(-1), s.calib.reshape(-1), s.train.reshape(-1)])
    assert seen.unique().numel() == seen.numel()
    with pytest.raises(ValueError, match="too few"):
        token_splits(ids, n_calib=3, n_eval=2, n_train=100, ctx=50, eval_ctx=100)


class _TwoHeads(nn.Module):
    """q and k read the same input (as in attention); o reads q's output."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 3, bias=False)
        self.k = nn.Linear(4, 3, bias=False)
        self.o = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.o(self.q(x)) + self.k(x).sum(-1, keepdim=True)


def test_capture_grams_matches_hand_products_and_skips_padding() -> None:
    torch.manual_seed(0)
    model = _TwoHeads()
    x1, x2 = torch.randn(2, 5, 4), torch.randn(1, 3, 4)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # two padded positions in the second sequence
    batches = [{"x": x1, "attention_mask": mask}, {"x": x2}]
    grams, counts = capture_grams(model, ["q", "k", "o"], batches, progress=False)
    rows = torch.cat([x1[mask.bool()], x2.reshape(-1, 4)]).double()
    # float32 products accumulated in float64: float32-level agreement
    torch.testing.assert_close(grams["q"], rows.T @ rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grams["k"], grams["q"])
    assert grams["k"] is not grams["q"]  # shared computation, separate accumulators
    with torch.no_grad():
        hidden = torch.cat([model.q(x1)[mask.bool()], model.q(x2).reshape(-1, 3)]).double()
    torch.testing.assert_close(grams["o"], hidden.T @ hidden, rtol=1e-5, atol=1e-5)
    assert counts == {"q": 11, "k": 11, "o": 11}
    assert not model.q._forward_hooks  # hooks removed


def test_swapped_weights_restores_originals() -> None:
    model = _TwoHeads()
    original = model.q.weight.detach().clone()
    ptr = model.q.weight.data_ptr()
    with swapped_weights(model, {"q": torch.zeros(3, 4)}):
        assert torch.count_nonzero(model.q.weight) == 0
    assert model.q.weight.data_ptr() == ptr and torch.equal(model.q.weight, original)


def test_mean_pool_ignores_padding_and_normalises() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 0.0]]))
