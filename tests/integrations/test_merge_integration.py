"""Adapters merged into a dense model for plain transformers, or re-quantized with any quantizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from integ_helpers import tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lqmod.integrations.peft as lqpeft  # noqa: E402
from lqmod.integrations.merge import merge_and_requantize, merge_to_dense  # noqa: E402
from lqmod.integrations.transformers import LqmodConfig  # noqa: E402
from lqmod.nn import QuantizedLinear  # noqa: E402

if TYPE_CHECKING:
    from peft import PeftModel

AutoModel = transformers.AutoModelForCausalLM


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out.float()


def finetuned(tmp_path: Path, *, use_dora: bool = False) -> PeftModel:
    """A tiny Llama quantized to NF4 on load (saved to ``quantized``), with PEFT adapters moved
    away from their init."""
    tiny_llama(1).save_pretrained(tmp_path / "dense")
    model = AutoModel.from_pretrained(tmp_path / "dense", quantization_config=LqmodConfig(quantizer="nf"))
    model.save_pretrained(tmp_path / "quantized")
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=lqpeft.target_modules(model), use_dora=use_dora)
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return pm


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_to_dense_is_exact_and_plain(tmp_path: Path, use_dora: bool) -> None:
    pm = finetuned(tmp_path, use_dora=use_dora)
    expected = logits(pm)
    merged = merge_to_dense(pm, torch.float32)
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    assert isinstance(merged, transformers.LlamaForCausalLM)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    reloaded = AutoModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_merge_to_bf16(tmp_path: Path) -> None:
    pm = finetuned(tmp_path)
    expected = logits(pm)
    merged = merge_to_dense(pm, torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModel.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    err = (logits(reloaded) - expected).abs().max() / expected.abs().max()
    assert float(err) < 0.05  # bf16 rounding of weights and activations, nothing more


def test_merge_and_requantize_reports_the_added_error(tmp_path: Path) -> None:
    pm = finetuned(tmp_path)
    exact = logits(pm)
    model, report = merge_and_requantize(pm)
    assert len(report.layers) == 7 and {r.quantizer for r in report.layers} == {"nf"}
    # NF4's error on the merged weights (about 0.09 relative for Gaussian-like weights).
    assert 0.05 < report.mean_rel_error < 0.15
    assert all(r.update_ratio > 0 for r in report.layers)
    requantized = logits(model)
    assert 0 < float((requantized - exact).abs().max()) < 0.2 * float(exact.abs().max())
    model.save_pretrained(tmp_path / "q")
    torch.testing.assert_close(logits(AutoModel.from_pretrained(tmp_path / "q")), requantized, rtol=0, atol=0)


def test_requantize_with_another_quantizer(tmp_path: Path) -> None:
    pm = finetuned(tmp_path)
    exact = logits(pm)
    model, report = merge_and_requantize(pm, "rtn", {"bits": 8, "group_size": 32})
    assert {r.quantizer for r in report.layers} == {"rtn"} and report.max_rel_error < 0.01
    assert {m.quantizer for m in model.modules() if isinstance(m, QuantizedLinear)} == {"rtn"}
    assert float((logits(model) - exact).abs().max()) < 0.02 * float(exact.abs().max())
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModel.from_pretrained(tmp_path / "q")
    assert {m.quantizer for m in reloaded.modules() if isinstance(m, QuantizedLinear)} == {"rtn"}


def test_peft_merge_and_unload_keeps_a_savable_quantized_model(tmp_path: Path) -> None:
    pm = finetuned(tmp_path)
    model = pm.merge_and_unload()
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 7
    before = logits(model)
    model.save_pretrained(tmp_path / "q")
    torch.testing.assert_close(logits(AutoModel.from_pretrained(tmp_path / "q")), before, rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_quantized_base_and_adapter_reload_without_original_weights(tmp_path: Path, use_dora: bool) -> None:
    """The serving route: base saved by transformers, adapter by PEFT, both reloaded by their owners."""
    pm = finetuned(tmp_path, use_dora=use_dora)
    expected = logits(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    shutil.rmtree(tmp_path / "dense")
    base = AutoModel.from_pretrained(tmp_path / "quantized")
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert sum(isinstance(m, lqpeft.LoraQuantizedLinear) for m in reloaded.modules()) == 7
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)


PLAIN_LOAD = """
import sys, transformers
for path in sys.argv[1:]:
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    except RuntimeError as exc:
        print("REFUSED", path)
    else:
        print("LOADED", path)
assert "lqmod" not in sys.modules
"""


@pytest.mark.slow
def test_plain_transformers_refuses_the_quantized_dir_and_loads_the_merged_one(tmp_path: Path) -> None:
    """In an interpreter that never imports lqmod: the quantized directory fails loudly (not a
    silently random model), the merged dense one loads."""
    pm = finetuned(tmp_path)
    merge_to_dense(pm, torch.float32).save_pretrained(tmp_path / "merged")
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "quantized"), str(tmp_path / "merged")],
        capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"REFUSED {tmp_path / 'quantized'}" in result.stdout
    assert f"LOADED {tmp_path / 'merged'}" in result.stdout
    # transformers' own warning names the method; the placeholders then stop the load.
    assert "Unknown quantization type, got lqmod" in result.stderr
    assert "q_proj.weight" in result.stderr and "MISMATCH" in result.stderr


def test_saving_the_base_with_adapters_injected_says_what_to_do(tmp_path: Path) -> None:
    pm = finetuned(tmp_path)
    base = pm.get_base_model()
    assert isinstance(base, transformers.PreTrainedModel)
    with pytest.raises(ValueError, match="carry PEFT adapters"):
        base.save_pretrained(tmp_path / "wrong")
