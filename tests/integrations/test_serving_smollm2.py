"""The serving route on the real SmolLM2-135M: OPTQ 4-bit through ``LqmodConfig``, PEFT LoRA,
``export_gptq_peft``, then GPTQModel's CPU kernel plus PEFT reproduce lqmod's finetuned model.

Two references, both plain torch + PEFT on the exported files: the GPTQ weights dequantized
in float32 (must give lqmod's float32 logits up to summation order), and the same with each
quantized layer computing in bfloat16, which is what GPTQModel's automatic CPU kernel for 4 bits
(``TorchFusedLinear``) does. GPTQModel may differ from lqmod's float32 logits by at most twice
what that plain-torch bfloat16 model does (the kernels' rule), plus 1e-3 of the largest logit.
The adapter is random, large enough to move the logits well above the bfloat16 noise; the
check is equivalence, not quality. Prints the measured numbers.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.gptqmodel]
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
try:
    from gptqmodel import BACKEND, GPTQModel
except Exception as exc:  # gptqmodel is optional; any import failure means "not available here"
    pytest.skip(f"gptqmodel is not importable ({type(exc).__name__}: {exc})", allow_module_level=True)
peft = pytest.importorskip("peft")
from serving_helpers import dense_from_gptq  # noqa: E402


def result_layers(base: Path) -> list[str]:
    """The quantized layers of an exported GPTQ base (the modules with a ``qweight``)."""
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        return sorted(k.removesuffix(".qweight") for k in f.keys() if k.endswith(".qweight"))  # noqa: SIM118


class _Bf16Linear(torch.nn.Linear):
    """A dense layer computing in bfloat16 and returning float32, as GPTQModel's CPU kernel does
    (still an ``nn.Linear``, so PEFT puts its LoRA on it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.to(torch.bfloat16), self.weight.to(torch.bfloat16)).float()
        return y if self.bias is None else y + self.bias


def _nll(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return logits, math.exp(float(loss))


def test_smollm2_optq_export_served_by_gptqmodel_and_peft(tmp_path: Path) -> None:
    from peft.import_utils import is_gptqmodel_available

    from lqmod.calibration.text import calibration_batches, calibration_paragraphs
    from lqmod.hf import load_local_model
    from lqmod.integrations.peft import target_modules
    from lqmod.integrations.serving import export_gptq_peft
    from lqmod.integrations.transformers import LqmodConfig, quantize_model

    try:
        if not is_gptqmodel_available():
            pytest.skip("PEFT does not take GPTQModel layers here")
    except ImportError as exc:
        pytest.skip(f"PEFT refuses GPTQModel without optimum (scripts/setup-gptqmodel.sh installs it): {exc}")
    try:
        model, tokenizer, _ = load_local_model("smollm2")
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"real SmolLM2 weights unavailable: {exc}")
    t0 = time.perf_counter()
    batches = calibration_batches(tokenizer, "causal-lm", "wikitext2", 8, length=128)
    report = quantize_model(model, LqmodConfig(quantizer="optq", config={"bits": 4, "group_size": 64}), batches=batches)
    assert len(report.layers) == 210
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=target_modules(model), task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 2e-2)
    pm.eval()
    text = " ".join(calibration_paragraphs("wikitext2")[40:60])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    ft_ref, ppl_lqmod = _nll(pm, ids)
    with pm.disable_adapter():
        base_ref, ppl_base = _nll(pm, ids)

    result = export_gptq_peft(pm, tmp_path / "serve", tokenizer=tokenizer)
    t1 = time.perf_counter()
    # Plain torch + PEFT on the exported files, float32 and bfloat16.
    dense = dense_from_gptq(result.base)
    exact = _nll(peft.PeftModel.from_pretrained(copy.deepcopy(dense), str(result.adapter)), ids)[0] - ft_ref
    for name in result_layers(result.base):
        dense.get_submodule(name).__class__ = _Bf16Linear
    plain = peft.PeftModel.from_pretrained(dense, str(result.adapter))
    plain_ft = _nll(plain, ids)[0]
    with plain.disable_adapter():
        plain_base = _nll(plain, ids)[0]
    own_bf16 = (plain_ft - ft_ref).abs().max().item()
    t2 = time.perf_counter()
    gm = GPTQModel.load(str(result.base), device="cpu", backend=BACKEND.AUTO, dtype=torch.float32)
    kernels = {type(m).__name__ for m in gm.model.modules() if "Linear" in type(m).__name__}
    served = peft.PeftModel.from_pretrained(gm.model, str(result.adapter))
    got, ppl_served = _nll(served, ids)
    with served.disable_adapter():
        base_served = _nll(served, ids)[0]
    t3 = time.perf_counter()
    err = (got - ft_ref).abs().max().item()

    def effect_cos(ft: torch.Tensor, base: torch.Tensor) -> float:
        """How well an adapter's effect on the logits lines up with lqmod's float32 one."""
        return float(torch.nn.functional.cosine_similarity((ft - base).flatten(), (ft_ref - base_ref).flatten(), dim=0))

    delta_cos, plain_cos = effect_cos(got, base_served), effect_cos(plain_ft, plain_base)
    bound = 2 * own_bf16 + 1e-3 * ft_ref.abs().max().item()
    agree = float((got.argmax(-1) == ft_ref.argmax(-1)).float().mean())
    moved = (ft_ref - base_ref).abs().max().item()
    print(
        f"\nSmolLM2 OPTQ-4 g64 + LoRA r8 -> GPTQ+PEFT -> GPTQModel {sorted(kernels)} + PEFT, {ids.shape[1]} tokens: "
        f"max |logit diff| vs lqmod fp32 {err:.4f} (bound {bound:.4f}; plain torch bf16 on the export "
        f"{own_bf16:.4f}; plain torch fp32 on the export {exact.abs().max().item():.2e}; largest logit "
        f"{ft_ref.abs().max().item():.1f}); the adapter moves logits by up to {moved:.3f}, served/lqmod adapter "
        f"effect cosine {delta_cos:.4f} (plain torch bf16: {plain_cos:.4f}); next-token agreement {agree:.3f}; "
        f"perplexity lqmod {ppl_lqmod:.2f} / "
        f"served {ppl_served:.2f} (base without adapter {ppl_base:.2f}); quantize+export {t1 - t0:.0f} s, "
        f"references {t2 - t1:.0f} s, GPTQModel load+forward {t3 - t2:.0f} s, threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    assert "TorchFusedLinear" in kernels
    torch.testing.assert_close(exact, torch.zeros_like(exact), rtol=0, atol=1e-4 * ft_ref.abs().max().item())
    assert err <= bound, (err, bound)
    assert delta_cos >= min(0.95, plain_cos - 0.02), (delta_cos, plain_cos)
    assert agree >= 0.95 and abs(ppl_served - ppl_lqmod) < 0.02 * ppl_lqmod
