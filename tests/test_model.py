"""quantize_model on transformers architectures: Llama, BERT (real MiniLM), GPT-2 Conv1D."""

from __future__ import annotations

import pytest
import torch

import lqmod
from lqmod.model import iter_lora_layers, lora_parameters, quantize_model, set_adapters_enabled


def _ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))


def test_llama_targets_and_step0_output_equals_quantized(tiny_llama: torch.nn.Module) -> None:
    report = quantize_model(tiny_llama, "nf", {"blocksize": 32}, lora={"r": 4}, progress=False)
    names = [r.name for r in report.layers]
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert isinstance(tiny_llama.lm_head, torch.nn.Linear)
    ids = _ids()
    with torch.no_grad():
        with_adapters = tiny_llama(ids).logits
        set_adapters_enabled(tiny_llama, False)
        without = tiny_llama(ids).logits
    # B = 0 at step 0, so the adapted model is exactly the quantized model.
    assert torch.equal(with_adapters, without)


def test_only_adapters_are_trainable(tiny_llama: torch.nn.Module) -> None:
    quantize_model(tiny_llama, "nf", {"blocksize": 32}, progress=False)
    trainable = {n.rsplit(".", 1)[-1] for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert len(lora_parameters(tiny_llama)) == 2 * 14
    out = tiny_llama(_ids(), labels=_ids())
    out.loss.backward()
    assert all(p.grad is not None for p in lora_parameters(tiny_llama))


def test_gpt2_conv1d_is_handled(tiny_gpt2: torch.nn.Module) -> None:
    ids = _ids()
    # Conv1D stores (in, out)
    w_dense = tiny_gpt2.get_parameter("transformer.h.0.attn.c_attn.weight").detach().t().clone()
    with torch.no_grad():
        ref = tiny_gpt2(ids).logits
    report = quantize_model(tiny_gpt2, "nf", {"bits": 4, "blocksize": 32}, progress=False)
    layer = tiny_gpt2.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, lqmod.LoRALinear) and layer.origin == "conv1d"
    assert layer.qweight.shape == tuple(w_dense.shape)
    err = (layer.dense_weight() - w_dense).norm() / w_dense.norm()
    assert err < 0.12
    with torch.no_grad():
        out = tiny_gpt2(ids).logits
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    assert len(report.layers) == 2 * 4


def test_bert_real_minilm(minilm_dir: str) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    report = quantize_model(model, "nf", {"blocksize": 64}, progress=False)
    assert len(report.layers) == 6 * 6 + 1  # six per layer and the pooler
    assert 4.12 < report.bits_per_param < 4.13
    with torch.no_grad():
        out = model(ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.mean(1), ref.mean(1)).item()
    assert cos > 0.9


def test_include_exclude_patterns(tiny_llama: torch.nn.Module) -> None:
    report = quantize_model(
        tiny_llama, "nf", {"blocksize": 32}, targets={"include": [r"mlp\."], "exclude": [r"down_proj"]},
        progress=False,
    )
    assert sorted({r.name.rsplit(".", 1)[-1] for r in report.layers}) == ["gate_proj", "up_proj"]


def test_no_match_is_an_error(tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="no linear layer matches"):
        quantize_model(tiny_llama, "nf", targets={"include": ["nothing-like-this"]}, progress=False)


def test_bad_config_leaves_model_untouched(tiny_llama: torch.nn.Module) -> None:
    # in_features of down_proj (128) fits 64, hidden (64) does not fit 128: the plug-in refuses,
    # but config *validation* happens before any layer is swapped.
    with pytest.raises(lqmod.ConfigError):
        quantize_model(tiny_llama, "nf", {"bits": 7}, progress=False)
    assert not list(iter_lora_layers(tiny_llama))


def test_plan_chooses_per_module(tiny_llama: torch.nn.Module) -> None:
    plan = {
        "modules": {
            "model.layers.0.self_attn.q_proj": {"quantizer": "nf", "config": {"bits": 2, "blocksize": 32}},
            "model.layers.1.mlp.down_proj": {"quantizer": "nf", "config": {"bits": 3, "blocksize": 64}},
        }
    }
    report = quantize_model(tiny_llama, plan=plan, progress=False)
    assert {r.name: r.config["bits"] for r in report.layers} == {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.mlp.down_proj": 3,
    }
    with pytest.raises(ValueError, match="not linear layers of this model"):
        quantize_model(tiny_llama, plan={"modules": {"model.nope": {"quantizer": "nf"}}}, progress=False)
