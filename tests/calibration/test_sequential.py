"""quantize_model_sequential: each block's Hessians are taken on what the quantized model feeds it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from calib_helpers import Recorder, padded_batch, reference_gram

import lqmod_lora_default
import lqmod_nf
from lqmod.calibration import (
    StatsCache,
    collect_hessians,
    diagonal_fisher,
    find_blocks,
    fisher_stats,
    quantize_model_sequential,
)
from lqmod.model import iter_lora_layers, quantize_model
from lqmod.plugins import Registry
from lqmod.quantize import QuantizationError


def _registry(*plugins: object) -> Registry:
    r = Registry(autoload=False)
    r.register(lqmod_nf, name="nf")
    r.register(lqmod_lora_default, name="lora-default")
    for i, p in enumerate(plugins):
        r.register(p, name=f"test{i}")
    return r


def _originals(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_hessians_are_taken_on_quantized_inputs(tiny_llama: torch.nn.Module) -> None:
    rec = Recorder()
    batches = [padded_batch(0), padded_batch(1)]
    original = copy.deepcopy(tiny_llama)
    originals = _originals(tiny_llama)
    report = quantize_model_sequential(
        tiny_llama, "rec", {"step": 0.05}, batches=batches, registry=_registry(rec), progress=False
    )
    names = [r.name for r in report.layers]
    assert len(names) == 14 and names == [n for n, _ in iter_lora_layers(tiny_llama)]
    got = rec.stats_by_name(originals)
    assert set(got) == set(names)
    # What the final quantized model feeds every layer, captured from its own forward pass.
    fed = reference_gram(tiny_llama, names, batches)
    before = collect_hessians(original, names, batches, progress=False)
    for name in names:
        s = got[name]
        assert s is not None and s.hessian is not None and s.n_tokens == fed[name][1] == 52
        torch.testing.assert_close(s.hessian, fed[name][0], rtol=1e-5, atol=1e-5)
        if name != "model.layers.0.self_attn.q_proj" and not name.startswith("model.layers.0.self_attn."):
            # Every layer downstream of a quantized one sees a different input than in the dense model.
            dense_h = before[name].hessian
            assert dense_h is not None
            assert not torch.allclose(s.hessian, dense_h, rtol=1e-3, atol=1e-4), name
    q0, q0_dense = got["model.layers.0.self_attn.q_proj"].hessian, before["model.layers.0.self_attn.q_proj"].hessian
    assert q0 is not None and q0_dense is not None
    torch.testing.assert_close(q0, q0_dense, rtol=1e-5, atol=1e-6)


def test_without_needs_equals_quantize_model(tiny_llama: torch.nn.Module) -> None:
    other = copy.deepcopy(tiny_llama)
    reg = _registry()
    r1 = quantize_model(tiny_llama, "nf", {"blocksize": 32}, lora={"r": 4}, registry=reg, progress=False)
    r2 = quantize_model_sequential(
        other, "nf", {"blocksize": 32}, lora={"r": 4}, batches=[padded_batch()], registry=reg, progress=False
    )
    assert r1.layers == r2.layers
    mods = dict(iter_lora_layers(other))
    for name, layer in iter_lora_layers(tiny_llama):
        for k, t in layer.qweight.tensors.items():
            assert torch.equal(t, mods[name].qweight.tensors[k])
        assert torch.equal(layer.lora_A, mods[name].lora_A) and torch.equal(layer.lora_B, mods[name].lora_B)
    ids = padded_batch(7)["input_ids"]
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, other(ids).logits)


def test_gpt2_and_outside_targets(tiny_gpt2: torch.nn.Module) -> None:
    """Conv1D blocks, and lm_head (outside the block list) quantized on a pass through the quantized blocks."""
    rec = Recorder()
    originals = {n: (m.weight.detach().t() if n != "lm_head" else m.weight.detach()).clone()
                 for n, m in tiny_gpt2.named_modules() if (hasattr(m, "weight") and "h." in n) or n == "lm_head"}
    batches = [padded_batch(2)]
    targets = {"include": [r"\.h\.1\.mlp\.c_fc$", r"^lm_head$"], "exclude": []}
    blocks = find_blocks(tiny_gpt2, ["transformer.h.1.mlp.c_fc"])
    assert blocks is not None and blocks[0] == "transformer.h"
    quantize_model_sequential(tiny_gpt2, "rec", batches=batches, targets=targets, registry=_registry(rec),
                              progress=False)
    got = rec.stats_by_name(originals)
    assert set(got) == {"transformer.h.1.mlp.c_fc", "lm_head"}
    fed = reference_gram(tiny_gpt2, list(got), batches)
    for name, s in got.items():
        torch.testing.assert_close(s.hessian, fed[name][0], rtol=1e-5, atol=1e-5)


def test_fisher_is_not_sequential(tiny_llama: torch.nn.Module) -> None:
    rec = Recorder("fish", frozenset({"fisher", "hessian"}))
    reg = _registry(rec)
    batches = [padded_batch()]
    names = ["model.layers.1.mlp.down_proj"]
    with pytest.raises(QuantizationError, match="diagonal_fisher"):
        quantize_model_sequential(tiny_llama, "fish", batches=batches, targets={"include": names},
                                  registry=reg, progress=False)
    assert not list(iter_lora_layers(tiny_llama))  # untouched
    fisher = diagonal_fisher(tiny_llama, names, batches, progress=False)
    quantize_model_sequential(tiny_llama, "fish", batches=batches, targets={"include": names},
                              stats=fisher_stats(fisher), registry=reg, progress=False)
    (_, stats), = rec.calls
    assert stats is not None and torch.equal(stats.fisher, fisher[names[0]]) and stats.hessian is not None


def test_quantize_model_names_missing_stats(tiny_llama: torch.nn.Module) -> None:
    reg = _registry(Recorder())
    with pytest.raises(QuantizationError) as info:
        quantize_model(tiny_llama, "rec", registry=reg, progress=False)
    msg = str(info.value)
    for part in ("model.layers.0.self_attn.q_proj", "'rec'", "'hessian'", "collect_hessians", "--calib-text"):
        assert part in msg
    assert not list(iter_lora_layers(tiny_llama))  # checked before any layer was touched


def test_cache_reuses_sequential_hessians(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    other = copy.deepcopy(tiny_llama)
    batches = [padded_batch(0)]
    cache = StatsCache(tmp_path)
    rec1, rec2 = Recorder(), Recorder()
    r1 = quantize_model_sequential(tiny_llama, "rec", batches=batches, registry=_registry(rec1), cache=cache,
                                   progress=False)
    assert len(list(tmp_path.iterdir())) == 1

    def no_forward(*_a: object, **_k: object) -> None:
        raise AssertionError("a cached run must not run the model")

    other.forward = no_forward
    r2 = quantize_model_sequential(other, "rec", batches=batches, registry=_registry(rec2), cache=cache,
                                   progress=False)
    assert r1.layers == r2.layers
    for (w1, s1), (w2, s2) in zip(rec1.calls, rec2.calls, strict=True):
        assert torch.equal(w1, w2) and torch.equal(s1.hessian, s2.hessian) and s1.n_tokens == s2.n_tokens


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.relu(self.fc1(h)))


class _Toy(torch.nn.Module):
    """An input projection before the block list and a head after it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _toy_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    first = {"x": torch.randn(2, 6, 16, generator=g), "attention_mask": mask}
    return [first, {"x": torch.randn(1, 5, 16, generator=g)}]


def test_layers_before_and_after_the_blocks() -> None:
    torch.manual_seed(0)
    model = _Toy()
    rec = Recorder()
    originals = _originals(model)
    targets = {"include": [".*"], "exclude": []}
    batches = _toy_batches()
    report = quantize_model_sequential(model, "rec", {"step": 0.1}, batches=batches, targets=targets,
                                       registry=_registry(rec), progress=False)
    names = [r.name for r in report.layers]
    assert names == ["proj", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]
    got = rec.stats_by_name(originals)
    assert list(got) == names  # quantized in forward order: proj first, head last
    fed = reference_gram(model, names, batches)
    for name in names:
        assert got[name].n_tokens == fed[name][1] == 15
        torch.testing.assert_close(got[name].hessian, fed[name][0], rtol=1e-5, atol=1e-6)


def test_toy_without_needs_equals_quantize_model() -> None:
    torch.manual_seed(0)
    a = _Toy()
    b = copy.deepcopy(a)
    targets = {"include": [".*"], "exclude": []}
    reg = _registry()
    quantize_model(a, "nf", {"blocksize": 16}, targets=targets, registry=reg, progress=False)
    quantize_model_sequential(b, "nf", {"blocksize": 16}, batches=_toy_batches(), targets=targets, registry=reg,
                              progress=False)
    x = _toy_batches()[0]["x"]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    for (_, la), (_, lb) in zip(iter_lora_layers(a), iter_lora_layers(b), strict=True):
        assert torch.equal(la.lora_A, lb.lora_A)


def test_a_failure_part_way_leaves_the_model_unchanged(
    tiny_llama: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lqmod.model import LayerQuantizer

    before = {n: t.clone() for n, t in tiny_llama.state_dict().items()}
    grads = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    real_build, calls = LayerQuantizer.build, [0]

    def fail_at_the_ninth(self: LayerQuantizer, name: str, stats: object) -> object:
        calls[0] += 1
        if calls[0] == 9:  # in the second block: the first block's layers are already swapped in
            raise RuntimeError("quantizer failed")
        return real_build(self, name, stats)  # type: ignore[arg-type]

    monkeypatch.setattr(LayerQuantizer, "build", fail_at_the_ninth)
    with pytest.raises(RuntimeError, match="quantizer failed"):
        quantize_model_sequential(tiny_llama, "nf", {"blocksize": 32}, lora={"r": 4}, batches=[padded_batch()],
                                  registry=_registry(), progress=False)
    assert calls[0] == 9
    assert not list(iter_lora_layers(tiny_llama))
    after = tiny_llama.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == grads
