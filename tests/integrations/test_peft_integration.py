"""PEFT LoRA/DoRA over lqmod QuantizedLinear: every quantizer, saved tensors, save/reload, merging."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import pytest
import torch
from integ_helpers import all_quantizers, quantized_pair, record_saved, tiny_llama
from torch import nn

peft = pytest.importorskip("peft")

import lqmod.integrations.peft as lqpeft  # noqa: E402  (registers with PEFT)
from lqmod.integrations.base import quantize_linears  # noqa: E402
from lqmod.nn import QuantizedLinear  # noqa: E402

if TYPE_CHECKING:
    from peft import LoraConfig

TARGET_NAMES = ["q_proj", "down_proj"]


def lora_config(**kw: object) -> LoraConfig:
    # init_lora_weights=False: B is random too, so the adapters change the output from step 0.
    base = {
        "r": 4, "lora_alpha": 8, "target_modules": TARGET_NAMES, "init_lora_weights": False, "lora_dropout": 0.0,
    }
    base.update(kw)
    return peft.LoraConfig(**base)


def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    state = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    missing = [k for k in state if k not in dst.state_dict()]
    assert not missing, missing
    dst.load_state_dict(state, strict=False)


def quantized_shapes(model: nn.Module) -> set[tuple[tuple[int, int], torch.dtype]]:
    """The dense shapes (either orientation: autograd may save ``W.t()``) of the quantized layers."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    shapes = [((m.out_features, m.in_features), (m.in_features, m.out_features)) for m in layers]
    return {(s, torch.float32) for pair in shapes for s in pair}


def loss_and_grads(
    model: nn.Module, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"
            grads[n] = p.grad.clone()
    return out.logits.detach(), out.loss.detach(), grads


SLOW_QUANTIZERS = {"lq", "lq-fisher", "quip"}  # seconds per tiny layer: their LoRA case runs in the slow pass


def quantizer_cases() -> list[object]:
    cases: list[object] = []
    for q in all_quantizers():
        slow = q in SLOW_QUANTIZERS
        cases.append(pytest.param(q, False, id=f"lora-{q}", marks=[pytest.mark.slow] if slow else []))
        if not slow:
            cases.append(pytest.param(q, True, id=f"dora-{q}"))
    return cases


@pytest.mark.parametrize(("quantizer", "use_dora"), quantizer_cases())
def test_peft_over_every_quantizer_matches_dense_twin(quantizer: str, use_dora: bool, tokens: torch.Tensor) -> None:
    """PEFT over QuantizedLinear computes what PEFT over nn.Linear holding the same (materialized)
    weights computes, outputs and adapter gradients, and saves no dense weight for backward."""
    qmodel, dense = quantized_pair(quantizer)
    pq = peft.get_peft_model(qmodel, lora_config(use_dora=use_dora))
    pd = peft.get_peft_model(dense, lora_config(use_dora=use_dora))
    layers = [m for m in pq.modules() if isinstance(m, lqpeft.LoraQuantizedLinear)]
    assert len(layers) == 2
    copy_adapters(pq, pd)
    with record_saved(pq) as rec:
        logits_q, _, grads_q = loss_and_grads(pq, tokens)
    logits_d, _, grads_d = loss_and_grads(pd, tokens)
    torch.testing.assert_close(logits_q, logits_d, rtol=1e-5, atol=1e-5)
    assert grads_q.keys() == grads_d.keys() and len(grads_q) == (6 if use_dora else 4)
    for name in grads_q:
        torch.testing.assert_close(grads_q[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)
    saved = set(rec.saved)
    assert not (quantized_shapes(pq) & saved), "a dense base weight was saved for backward"


def test_saved_tensor_check_detects_a_saved_weight(tokens: torch.Tensor) -> None:
    """The control: the QLoRA-style layer (dense weight kept for backward) is caught by the same check."""
    qmodel, _ = quantized_pair("nf")
    for m in qmodel.modules():
        if isinstance(m, QuantizedLinear):
            m.materialize_in_backward = False
    pq = peft.get_peft_model(qmodel, lora_config())
    with record_saved(pq) as rec:
        loss_and_grads(pq, tokens)
    assert quantized_shapes(pq) & set(rec.saved)


def test_dora_with_dropout_in_training_saves_no_dense_weight(tokens: torch.Tensor) -> None:
    # With dropout active PEFT's own DoRA multiplies the input by the dense weight under autograd.
    qmodel, _ = quantized_pair("nf")
    pq = peft.get_peft_model(qmodel, lora_config(use_dora=True, lora_dropout=0.1))
    pq.train()
    with record_saved(pq) as rec:
        _, loss, grads = loss_and_grads(pq, tokens)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert not (quantized_shapes(pq) & set(rec.saved))


def test_only_adapters_train_and_base_stays_quantized(tokens: torch.Tensor) -> None:
    qmodel, _ = quantized_pair("nf")
    pq = peft.get_peft_model(qmodel, lora_config(use_dora=True))
    trainable = {n for n, p in pq.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(b.requires_grad for b in pq.buffers())
    base = [m for m in pq.modules() if isinstance(m, QuantizedLinear)]
    assert len(base) == 2 and all(m.base.codes.dtype == torch.uint8 for m in base)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_save_and_reload_with_peft(tmp_path: object, use_dora: bool, tokens: torch.Tensor) -> None:
    qmodel, _ = quantized_pair("nf")
    fresh = copy.deepcopy(qmodel)
    pq = peft.get_peft_model(qmodel, lora_config(use_dora=use_dora))
    with torch.no_grad():  # make the adapters differ from any initialisation
        for n, p in pq.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
    pq.save_pretrained(str(tmp_path))
    reloaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    assert any(isinstance(m, lqpeft.LoraQuantizedLinear) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, pq(input_ids=tokens).logits, rtol=0, atol=0)


def test_merge_requantizes_and_unmerge_restores_the_exact_base(tokens: torch.Tensor) -> None:
    qmodel, _ = quantized_pair("nf")
    pq = peft.get_peft_model(qmodel, lora_config())
    layer = next(m for m in pq.modules() if isinstance(m, lqpeft.LoraQuantizedLinear))
    old_base = layer.get_base_layer()
    assert isinstance(old_base, QuantizedLinear)
    codes_before = old_base.qweight.tensors["codes"].clone()
    with torch.no_grad():
        before = pq(input_ids=tokens).logits
        w_merged_exact = old_base.dequantize(torch.float32) + layer.get_delta_weight("default")
        pq.merge_adapter()
        after = pq(input_ids=tokens).logits
        new_base = layer.get_base_layer()
        assert isinstance(new_base, QuantizedLinear) and new_base.quantizer == "nf"
        # The merged base is W + dW re-quantized with the same quantizer: its error is NF4's error.
        rel = (new_base.dequantize(torch.float32) - w_merged_exact).norm() / w_merged_exact.norm()
        assert 0 < float(rel) < 0.15
        assert not torch.equal(new_base.qweight.tensors["codes"], codes_before)
        assert (after - before).abs().max() < 0.1 * before.abs().max()
        pq.unmerge_adapter()
        restored = layer.get_base_layer()
        assert isinstance(restored, QuantizedLinear)
        assert torch.equal(restored.qweight.tensors["codes"], codes_before)
        torch.testing.assert_close(pq(input_ids=tokens).logits, before, rtol=0, atol=0)


def test_merge_with_a_quantizer_needing_statistics_says_what_to_do() -> None:
    qmodel, _ = quantized_pair("optq")
    pq = peft.get_peft_model(qmodel, lora_config())
    with pytest.raises(ValueError, match="needs calibration statistics"):
        pq.merge_adapter()


def test_unsupported_lora_options_are_refused() -> None:
    qmodel, _ = quantized_pair("nf")
    with pytest.raises(ValueError, match=r"lora_bias=True\) is not supported"):
        peft.get_peft_model(qmodel, lora_config(lora_bias=True))


def test_config_made_before_registration_and_all_linear() -> None:
    """``add_to_config`` fixes a config made before the import; ``target_modules`` replaces "all-linear"."""
    model = tiny_llama(1)
    quantize_linears(model, "nf", {})
    cfg = lora_config(target_modules=lqpeft.target_modules(model))
    cfg._custom_modules = None  # as if created before lqmod.integrations.peft was imported
    with pytest.raises(ValueError, match="is not supported"):
        peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg))
    pm = peft.get_peft_model(model, lqpeft.add_to_config(cfg))
    assert sum(isinstance(m, lqpeft.LoraQuantizedLinear) for m in pm.modules()) == 7
    with pytest.raises(ValueError, match="no lqmod QuantizedLinear"):
        lqpeft.target_modules(tiny_llama(1))


def test_modules_to_save_train_in_full_beside_the_adapters(tmp_path: object, tokens: torch.Tensor) -> None:
    qmodel, _ = quantized_pair("nf")
    fresh = copy.deepcopy(qmodel)
    pq = peft.get_peft_model(qmodel, lora_config(modules_to_save=["lm_head"]))
    _, _, grads = loss_and_grads(pq, tokens)
    full = [n for n in grads if "lm_head" in n]
    assert full and all(grads[n].abs().sum() > 0 for n in full)
    assert any("lora_A" in n for n in grads)
    with torch.no_grad():
        for p in pq.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    pq.save_pretrained(str(tmp_path))
    reloaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, pq(input_ids=tokens).logits, rtol=0, atol=0)
