"""PEFT LoRA over lqmod NF4 matches PEFT LoRA over bitsandbytes NF4: same weights, same adapters."""

from __future__ import annotations

import pytest
import torch
from integ_helpers import TARGETS, tiny_llama
from torch import nn

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

import lqmod.integrations.peft as lqpeft  # noqa: E402
from lqmod.integrations.base import quantize_linears, resolve_entries  # noqa: E402
from lqmod.model import replace_module  # noqa: E402
from lqmod.nn import QuantizedLinear  # noqa: E402


def bnb_nf4(model: nn.Module, names: list[str], *, double_quant: bool) -> None:
    for name in names:
        old = model.get_submodule(name)
        assert isinstance(old, nn.Linear), name
        new = bnb.nn.Linear4bit(
            old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=torch.float32,
            compress_statistics=double_quant, quant_type="nf4",
        )
        new.weight = bnb.nn.Params4bit(
            old.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
            compress_statistics=double_quant,
        )
        new = new.to("cpu")  # Params4bit quantizes on its first .to()
        # bnb repacks CPU weights for a bf16 inference kernel on the first eval forward; keep NF4.
        new.support_avx512bf16_for_cpu = False
        replace_module(model, name, new)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_lqmod_nf4_matches_bitsandbytes_nf4_through_peft(double_quant: bool, tokens: torch.Tensor) -> None:
    lq_model, bnb_model = tiny_llama(1), tiny_llama(1)
    names = list(resolve_entries(lq_model, "nf", None, targets=TARGETS))
    quantize_linears(lq_model, "nf", {"bits": 4, "blocksize": 64, "double_quant": double_quant}, targets=TARGETS)
    bnb_nf4(bnb_model, names, double_quant=double_quant)

    # The same dense weights, bit for bit: lqmod's NF4 is bitsandbytes' format.
    for name in names:
        lq_layer = lq_model.get_submodule(name)
        assert isinstance(lq_layer, QuantizedLinear)
        bnb_layer = bnb_model.get_submodule(name)
        w_bnb = bnb.functional.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state).float()
        torch.testing.assert_close(lq_layer.dequantize(torch.float32), w_bnb, rtol=0, atol=0)

    def config() -> object:
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)

    pl, pb = peft.get_peft_model(lq_model, config()), peft.get_peft_model(bnb_model, config())
    assert sum(isinstance(m, lqpeft.LoraQuantizedLinear) for m in pl.modules()) == 2
    assert sum(isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit) for m in pb.modules()) == 2
    pb.load_state_dict({k: v for k, v in pl.state_dict().items() if "lora_" in k}, strict=False)
    results = []
    for pm in (pl, pb):
        pm.train()
        out = pm(input_ids=tokens, labels=tokens)
        out.loss.backward()
        grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    (logits_l, grads_l), (logits_b, grads_b) = results
    torch.testing.assert_close(logits_l, logits_b, rtol=1e-5, atol=1e-5)
    assert grads_l.keys() == grads_b.keys() and len(grads_l) == 4
    for name in grads_l:
        torch.testing.assert_close(grads_l[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
