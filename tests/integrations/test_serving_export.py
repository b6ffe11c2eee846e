"""The serving export (GPTQ base + PEFT adapter) without GPTQModel: what it writes, that an
independent GPTQ reader plus plain PEFT reproduce lqmod's logits, errors and atomicity.

Both model kinds: lqmod's own (LoRALinear) and transformers + ``LqmodConfig`` + PEFT. The
logits are compared in float32 with the weights dequantized from the GPTQ tensors by a reader
written from the format description (``serving_helpers.dense_from_gptq``): the same float16
scales times the same integer codes, so the weights are equal and only the summation order of
the matmuls may differ (rtol 1e-5, atol 1e-6 of logits of size ~0.5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from integ_helpers import tiny_llama
from safetensors.torch import load_file
from serving_helpers import (
    DENSE,
    ODD,
    dense_from_gptq,
    lqmod_logits,
    lqmod_native,
    peft_over_lqmod,
    tiny_tokenizer,
)

from lqmod.integrations.formats import base_formats
from lqmod.integrations.serving import collect_base, export_for_serving, export_gptq_peft
from lqmod.model import iter_lora_layers, quantize_model
from lqmod_optq.gptq_checkpoint import read_gptq_checkpoint

peft = pytest.importorskip("peft")
torch.set_num_threads(1)
TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))


def _check_layout(out: Path, n_quantized: int) -> dict[str, object]:
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "base", "lqmod-export.json"]
    assert {"model.safetensors", "quantize_config.json", "config.json", "tokenizer.json"} <= {
        p.name for p in (out / "base").iterdir()
    }
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (out / "adapter").iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporaries left
    qc = json.loads((out / "base" / "quantize_config.json").read_text())
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] is True
    assert qc["dynamic"][f"+:^{ODD.replace('.', chr(92) + '.')}$"] == {"bits": 3, "desc_act": True, "sym": False}
    assert f"-:^{DENSE.replace('.', chr(92) + '.')}$" in qc["dynamic"]
    config = json.loads((out / "base" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    record = json.loads((out / "lqmod-export.json").read_text())
    assert record["base_format"] == "gptq" and record["quantized_layers"] == n_quantized
    return record


def test_lqmod_native_export_reproduces_base_and_finetuned_logits(tmp_path: Path, ids: torch.Tensor) -> None:
    model = lqmod_native()
    layers = dict(iter_lora_layers(model))
    base_ref, ft_ref = lqmod_logits(model, ids, adapters=False), lqmod_logits(model, ids)
    assert (ft_ref - base_ref).abs().max() > 1e-2  # the adapter matters
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    result = export_gptq_peft(model, tmp_path / "serve", tokenizer=tiny_tokenizer())
    assert result.base_format == "gptq" and result.quantizers == ("optq",) and result.n_layers == len(layers)
    _check_layout(tmp_path / "serve", len(layers))
    # The model is untouched.
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())

    # lqmod's own reader gives back the exact quantized tensors ...
    read = read_gptq_checkpoint(result.base)
    assert sorted(read) == sorted(layers)
    for name, layer in layers.items():
        assert all(torch.equal(read[name].tensors[k], v) for k, v in layer.qweight.tensors.items()), name
    # ... and an independent reader + plain transformers give lqmod's base logits,
    dense = dense_from_gptq(result.base)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, base_ref, **TOL)
    # and plain PEFT on top gives the finetuned logits.
    adapter_cfg = json.loads((result.adapter / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(result.base.resolve())
    assert adapter_cfg["lora_alpha"] == adapter_cfg["r"] == 4  # alpha / r = 2 folded into lora_B
    served = peft.PeftModel.from_pretrained(dense, result.adapter)
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, ft_ref, **TOL)

    # Unfolded: the trained tensors and alpha exactly as they are, the same logits.
    kept = export_gptq_peft(model, tmp_path / "kept", fold_scaling=False)
    assert json.loads((kept.adapter / "adapter_config.json").read_text())["lora_alpha"] == 8
    stored = load_file(str(kept.adapter / "adapter_model.safetensors"))
    for name, layer in layers.items():
        assert torch.equal(stored[f"base_model.model.{name}.lora_B.weight"], layer.lora_B.detach())
    served = peft.PeftModel.from_pretrained(dense_from_gptq(kept.base), kept.adapter)
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, ft_ref, **TOL)


def test_peft_over_lqmod_config_export_reproduces_logits(tmp_path: Path, ids: torch.Tensor) -> None:
    pm = peft_over_lqmod(tmp_path)
    base_ref, ft_ref = lqmod_logits(pm, ids, adapters=False), lqmod_logits(pm, ids)
    assert (ft_ref - base_ref).abs().max() > 1e-2

    base = collect_base(pm)  # plain names: no "base_model.model." / ".base_layer"
    assert ODD in base.layers and DENSE not in base.layers and DENSE in base.dense_linears
    assert "lm_head" in base.dense_linears and "lm_head.weight" in base.tensors
    assert not [k for k in base.tensors if "lora_" in k or "base_layer" in k or k.startswith("base_model")]

    out = tmp_path / "serve"
    result = export_gptq_peft(pm, out, tokenizer=tiny_tokenizer())
    _check_layout(out, len(base.layers))
    # Still a working PEFT model with its adapters.
    torch.testing.assert_close(lqmod_logits(pm, ids), ft_ref, rtol=0, atol=0)

    dense = dense_from_gptq(result.base)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, base_ref, **TOL)
    served = peft.PeftModel.from_pretrained(dense, result.adapter)
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, ft_ref, **TOL)
    # The adapter is PEFT's own save: its keys name the plain base's modules.
    keys = load_file(str(result.adapter / "adapter_model.safetensors"))
    assert f"base_model.model.{ODD}.lora_A.weight" in keys and "base_model.model.lm_head.lora_B.weight" in keys


def test_named_adapter_and_gptq_v2(tmp_path: Path, ids: torch.Tensor) -> None:
    pm = peft_over_lqmod(tmp_path, mixed=False)
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    pm.set_adapter("second")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B.second" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ref = lqmod_logits(pm, ids)
    result = export_gptq_peft(pm, tmp_path / "v2", checkpoint_format="gptq_v2")
    qc = json.loads((result.base / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq_v2" and "dynamic" not in qc
    assert json.loads((result.adapter / "adapter_config.json").read_text())["target_modules"] == ["v_proj"]
    read = read_gptq_checkpoint(result.base)
    assert sorted(read) == sorted(collect_base(pm).layers)
    dense = dense_from_gptq(result.base)
    served = peft.PeftModel.from_pretrained(dense, result.adapter)
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits.float(), ref, **TOL)


def test_refusals_write_nothing(tmp_path: Path) -> None:
    model = tiny_llama()
    quantize_model(model, "nf", {}, progress=False)
    out = tmp_path / "x"
    with pytest.raises(ValueError, match=r"'gptq' serving format holds layers quantized with optq only; .* use nf"):
        export_gptq_peft(model, out)
    with pytest.raises(ValueError, match="unknown serving format 'awq'; registered: gptq"):
        export_for_serving(model, out, base_format="awq")
    with pytest.raises(ValueError, match=r"takes options \['checkpoint_format'\], not \['bits'\]"):
        export_for_serving(model, out, base_format="gptq", options={"bits": 4})
    with pytest.raises(ValueError, match="no quantized layers"):
        export_gptq_peft(tiny_llama(), out)
    dora = peft_over_lqmod(tmp_path / "d", mixed=False, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        export_gptq_peft(dora, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]


def test_atomic_on_failure_and_overwrite(tmp_path: Path, ids: torch.Tensor) -> None:
    model = lqmod_native(mixed=False)
    out = tmp_path / "serve"

    class Broken:
        def save_pretrained(self, folder: str) -> None:
            (Path(folder) / "tokenizer.json").write_text("{")  # half-written, then a failure
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_gptq_peft(model, out, tokenizer=Broken())
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".serve.")]
    export_gptq_peft(model, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gptq_peft(model, out)
    first = (out / "base" / "model.safetensors").read_bytes()
    with pytest.raises(OSError, match="disk full"):
        export_gptq_peft(model, out, tokenizer=Broken(), overwrite=True)
    assert (out / "base" / "model.safetensors").read_bytes() == first  # the old export is intact
    export_gptq_peft(model, out, overwrite=True)
    assert (out / "base" / "model.safetensors").read_bytes() == first  # deterministic


def test_gptq_format_is_registered_by_the_plugin() -> None:
    fmt = base_formats()["gptq"]
    assert fmt.quantizers == ("optq",) and fmt.options == ("checkpoint_format",)
    assert fmt.write.__module__ == "lqmod_optq.gptq_serving"


def test_public_entry_point() -> None:
    import lqmod.integrations

    assert lqmod.integrations.export_gptq_peft is export_gptq_peft
    assert lqmod.integrations.export_for_serving is export_for_serving
    with pytest.raises(AttributeError, match="no attribute 'export_awq'"):
        lqmod.integrations.export_awq  # noqa: B018


def test_modules_to_save_travel_with_the_adapter(tmp_path: Path, ids: torch.Tensor) -> None:
    # A fully trained module (PEFT's modules_to_save): the base keeps the original, the adapter
    # carries the trained copy, and PEFT puts it back.
    pm = peft_over_lqmod(tmp_path, mixed=False, modules_to_save=["norm"])
    with torch.no_grad():
        trained = pm.get_base_model().model.norm.modules_to_save["default"].weight
        trained.mul_(1.5)
    ft_ref = lqmod_logits(pm, ids)
    base = collect_base(pm)
    assert torch.equal(base.tensors["model.norm.weight"], torch.ones(64))  # the original module
    result = export_gptq_peft(pm, tmp_path / "serve")
    served = peft.PeftModel.from_pretrained(dense_from_gptq(result.base), result.adapter)
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, ft_ref, **TOL)
