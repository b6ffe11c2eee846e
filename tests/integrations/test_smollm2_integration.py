"""The real SmolLM2-135M through the whole route: quantize, PEFT LoRA step, save, reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from integ_helpers import record_saved

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lqmod.integrations.peft as lqpeft  # noqa: E402
from lqmod.integrations.transformers import LqmodConfig, quantize_model  # noqa: E402
from lqmod.nn import QuantizedLinear  # noqa: E402


@pytest.mark.slow
def test_smollm2_nf4_peft_step_save_and_reload(tmp_path: Path) -> None:
    from lqmod.hf import load_local_model

    try:
        model, tokenizer, _ = load_local_model("smollm2")
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"real SmolLM2 weights unavailable: {exc}")
    ids = tokenizer("Paris is the capital of France, and Berlin is", return_tensors="pt").input_ids
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    report = quantize_model(model, LqmodConfig(quantizer="nf", config={"bits": 4, "blocksize": 64}))
    assert len(report.layers) == 210 and 4.1 < report.bits_per_param < 4.2
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=lqpeft.target_modules(model)))
    shapes = {
        ((m.out_features, m.in_features), torch.float32) for m in pm.modules() if isinstance(m, QuantizedLinear)
    }
    with record_saved(pm) as rec:
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
    assert not (shapes & set(rec.saved)), "a dense base weight was saved for backward"
    # NF4 on top of the GGUF's Q4_1 weights: close to the dense model, not equal to it.
    cos = torch.nn.functional.cosine_similarity(out.logits.detach().flatten(), dense_logits.flatten(), dim=0)
    agree = (out.logits.argmax(-1) == dense_logits.argmax(-1)).float().mean()
    print(f"logit cosine {float(cos):.4f}, next-token agreement {float(agree):.2f}")
    assert float(cos) > 0.9 and float(agree) >= 0.6
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.01 * torch.randn_like(p))
        expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
