"""collect_hessians against float64 references computed from the captured raw inputs."""

from __future__ import annotations

import pytest
import torch
from calib_helpers import padded_batch, reference_gram

from lqmod.calibration import collect_hessians

LLAMA = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.1.mlp.down_proj",
]


def test_llama_padded_batch_matches_float64_reference(tiny_llama: torch.nn.Module) -> None:
    batches = [padded_batch(0), padded_batch(1)]
    stats = collect_hessians(tiny_llama, LLAMA, batches, progress=False)
    ref = reference_gram(tiny_llama, LLAMA, batches)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert n_real == 2 * (12 + 9 + 5)
    for name in LLAMA:
        h, n, absmean = ref[name]
        s = stats[name]
        assert s.hessian is not None and s.hessian.dtype == torch.float64
        assert s.n_tokens == n == n_real
        torch.testing.assert_close(s.hessian, h, rtol=1e-5, atol=1e-6)
        assert s.act_absmean is not None and s.act_absmean.dtype == torch.float32
        torch.testing.assert_close(s.act_absmean.double(), absmean, rtol=1e-5, atol=1e-7)
    # q, k and v read the same tensor: one shared product, identical bit for bit.
    q, k, v = (stats[n].hessian for n in LLAMA[:3])
    assert q is not None and k is not None and v is not None
    assert torch.equal(q, k) and torch.equal(q, v) and q is not k


def test_padding_is_excluded(tiny_llama: torch.nn.Module) -> None:
    """A right-padded batch gives the statistics of its sequences run one by one, unpadded."""
    batch = padded_batch(2)
    padded = collect_hessians(tiny_llama, LLAMA, [batch], progress=False)
    singles = []
    for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        singles.append({"input_ids": batch["input_ids"][i : i + 1, :length]})
    alone = collect_hessians(tiny_llama, LLAMA, singles, progress=False)
    for name in LLAMA:
        assert padded[name].n_tokens == alone[name].n_tokens == 26
        torch.testing.assert_close(padded[name].hessian, alone[name].hessian, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d(tiny_gpt2: torch.nn.Module) -> None:
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    batches = [padded_batch(3)]
    stats = collect_hessians(tiny_gpt2, names, batches, progress=False)
    ref = reference_gram(tiny_gpt2, names, batches)
    h0, h1 = stats[names[0]].hessian, stats[names[1]].hessian
    assert h0 is not None and h0.shape == (64, 64)
    assert h1 is not None and h1.shape == (256, 256)
    for name in names:
        torch.testing.assert_close(stats[name].hessian, ref[name][0], rtol=1e-5, atol=1e-5)
        assert stats[name].n_tokens == 26


def test_bad_names_are_clear(tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"no module 'model\.nope'"):
        collect_hessians(tiny_llama, ["model.nope"], [padded_batch()], progress=False)
    with pytest.raises(ValueError, match="not a linear layer"):
        collect_hessians(tiny_llama, ["model.layers.0.mlp"], [padded_batch()], progress=False)
    with pytest.raises(ValueError, match="no calibration token"):
        collect_hessians(tiny_llama, LLAMA[:1], [], progress=False)
    assert not tiny_llama.get_submodule("model.layers.0.self_attn.q_proj")._forward_hooks
