"""diagonal_fisher against per-example references from independent single-example backward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from calib_helpers import padded_batch

from lqmod.calibration import (
    causal_lm_loss,
    default_loss,
    diagonal_fisher,
    fisher_stats,
    sentence_contrastive_loss,
)
from lqmod.types import LayerStats

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def _hf_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' own LM loss (labels -100 at padding): an independent reference of causal_lm_loss."""
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None, "backward left no gradient"
    return p.grad


def _reference(model: torch.nn.Module, names: list[str], batches: list[dict[str, torch.Tensor]]) -> dict:
    sums = {n: torch.zeros_like(model.get_parameter(f"{n}.weight"), dtype=torch.float64) for n in names}
    count = 0
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            model.zero_grad(set_to_none=True)
            _hf_loss(model, b["input_ids"][i : i + 1], b["attention_mask"][i : i + 1]).backward()
            for n in names:
                sums[n] += _grad(model.get_parameter(f"{n}.weight")).double() ** 2
            count += 1
    model.zero_grad(set_to_none=True)
    return {n: s / count for n, s in sums.items()}


def test_causal_lm_loss_matches_transformers(tiny_llama: torch.nn.Module) -> None:
    b = padded_batch(0)
    per = causal_lm_loss(tiny_llama, b)
    assert per.shape == (3,)
    for i in range(3):
        ref = _hf_loss(tiny_llama, b["input_ids"][i : i + 1], b["attention_mask"][i : i + 1])
        torch.testing.assert_close(per[i], ref, rtol=1e-5, atol=1e-6)


def test_per_example_fisher_matches_loop(tiny_llama: torch.nn.Module) -> None:
    batches = [padded_batch(0), padded_batch(1)]
    ref = _reference(tiny_llama, NAMES, batches)
    fisher = diagonal_fisher(tiny_llama, NAMES, batches, progress=False)
    for n in NAMES:
        assert fisher[n].dtype == torch.float32 and fisher[n].shape == ref[n].shape
        torch.testing.assert_close(fisher[n].double(), ref[n], rtol=1e-4, atol=1e-12)
    # The squared batch gradient is a different (smaller) quantity: per_example matters.
    batch_sq = diagonal_fisher(tiny_llama, NAMES, batches, per_example=False, progress=False)
    assert float(batch_sq[NAMES[0]].sum()) < float(fisher[NAMES[0]].sum())


def test_batch_gradient_mode(tiny_llama: torch.nn.Module) -> None:
    b = padded_batch(4)
    got = diagonal_fisher(tiny_llama, NAMES[:1], [b], per_example=False, progress=False)
    w = tiny_llama.get_parameter(f"{NAMES[0]}.weight")
    (g,) = torch.autograd.grad(causal_lm_loss(tiny_llama, b).mean(), [w])
    torch.testing.assert_close(got[NAMES[0]], g.square(), rtol=1e-5, atol=1e-12)


def test_model_state_is_left_alone(tiny_llama: torch.nn.Module) -> None:
    params = dict(tiny_llama.named_parameters())
    for i, p in enumerate(params.values()):
        p.requires_grad_(i % 2 == 0)
    q = params[NAMES[0] + ".weight"]
    q.grad = torch.full_like(q, 7.0)
    flags = {n: p.requires_grad for n, p in params.items()}
    tiny_llama.train()
    diagonal_fisher(tiny_llama, NAMES, [padded_batch()], progress=False)
    assert {n: p.requires_grad for n, p in params.items()} == flags
    assert torch.equal(q.grad, torch.full_like(q, 7.0))
    assert all(p.grad is None for n, p in params.items() if n != NAMES[0] + ".weight")
    assert tiny_llama.training


def test_conv1d_is_out_by_in(tiny_gpt2: torch.nn.Module) -> None:
    name = "transformer.h.0.attn.c_attn"
    b = padded_batch(5)
    fisher = diagonal_fisher(tiny_gpt2, [name], [b], progress=False)[name]
    weight = tiny_gpt2.get_parameter(f"{name}.weight")  # (in, out) = (64, 192)
    assert fisher.shape == (192, 64)
    ref = torch.zeros_like(weight)
    for i in range(3):
        tiny_gpt2.zero_grad(set_to_none=True)
        _hf_loss(tiny_gpt2, b["input_ids"][i : i + 1], b["attention_mask"][i : i + 1]).backward()
        ref += _grad(weight) ** 2 / 3
    tiny_gpt2.zero_grad(set_to_none=True)
    torch.testing.assert_close(fisher, ref.t(), rtol=1e-4, atol=1e-12)


def _bert_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (n, 8), generator=g)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[1, 5:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_contrastive_loss_and_fisher_on_encoder(tiny_bert: torch.nn.Module) -> None:
    assert default_loss(tiny_bert) is sentence_contrastive_loss
    b = _bert_batch(6)
    per = sentence_contrastive_loss(tiny_bert, b)
    assert per.shape == (3,)
    # Reference: embeddings by hand, MultipleNegativesRankingLoss(scale=20) per anchor.
    hidden = tiny_bert(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    emb = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    scores = 20 * emb[0::2] @ emb[1::2].T
    torch.testing.assert_close(per, F.cross_entropy(scores, torch.arange(3), reduction="none"))

    name = "encoder.layer.0.attention.self.query"
    weight = tiny_bert.get_parameter(f"{name}.weight")
    tiny_bert.train()  # dropout is on in this config: the Fisher must be measured without it
    fisher = diagonal_fisher(tiny_bert, [name], [b], progress=False)[name]
    assert tiny_bert.training
    tiny_bert.eval()
    ref = torch.zeros_like(weight)
    for i in range(3):
        (g,) = torch.autograd.grad(sentence_contrastive_loss(tiny_bert, b)[i], [weight])
        ref += g**2 / 3
    torch.testing.assert_close(fisher, ref, rtol=1e-4, atol=1e-12)
    assert weight.grad is None
    with pytest.raises(ValueError, match="at least 4 texts"):
        sentence_contrastive_loss(tiny_bert, _bert_batch(3))


def test_default_loss_and_fisher_stats(tiny_llama: torch.nn.Module) -> None:
    assert default_loss(tiny_llama) is causal_lm_loss
    f = {"a": torch.ones(2, 3)}
    h = {"a": LayerStats(hessian=torch.eye(3, dtype=torch.float64), n_tokens=5), "b": LayerStats(n_tokens=1)}
    merged = fisher_stats(f, h)
    assert merged["a"].fisher is f["a"] and merged["a"].n_tokens == 5 and merged["a"].hessian is not None
    assert h["a"].fisher is None  # the input is not modified
    assert fisher_stats(f)["a"].hessian is None
