"""The "lqmod" transformers quantization method: quantize on load, save, reload, plans, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from integ_helpers import SMALL_CONFIGS, fake_stats, tiny_llama

transformers = pytest.importorskip("transformers")

import lqmod  # noqa: E402
from lqmod.integrations.base import quantize_linears, resolve_entries  # noqa: E402
from lqmod.integrations.transformers import LqmodConfig, quantize_model  # noqa: E402
from lqmod.nn import QuantizedLinear  # noqa: E402

AutoModel = transformers.AutoModelForCausalLM


@pytest.fixture
def dense_dir(tmp_path: Path) -> Path:
    tiny_llama(2).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def weight_only_quantizers() -> list[object]:
    registry = lqmod.get_registry()
    slow = {"lq", "lq-fisher", "quip"}
    return [
        pytest.param(q, marks=[pytest.mark.slow] if q in slow else [])
        for q, spec in sorted(registry.quantizers().items())
        if not spec.needs
    ]


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


def quantized_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if ".base." in n}


@pytest.mark.parametrize("quantizer", weight_only_quantizers())
def test_quantize_on_load_save_and_reload(quantizer: str, dense_dir: Path, tmp_path: Path) -> None:
    cfg = SMALL_CONFIGS.get(quantizer, {})
    model = AutoModel.from_pretrained(dense_dir, quantization_config=LqmodConfig(quantizer=quantizer, config=cfg))
    layers = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 14 and not any("lm_head" in n or "embed" in n for n in layers)
    # What quantizing the loaded dense model in memory gives, tensor for tensor.
    reference = AutoModel.from_pretrained(dense_dir)
    quantize_linears(reference, quantizer, cfg)
    ref_tensors, got = quantized_tensors(reference), quantized_tensors(model)
    assert ref_tensors.keys() == got.keys()
    for name in got:
        assert torch.equal(got[name], ref_tensors[name]), name
    before = logits(model)
    torch.testing.assert_close(before, logits(reference), rtol=0, atol=0)

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "lqmod" and set(saved["layers"]) == layers
    shutil.rmtree(dense_dir)  # no original weights from here on
    reloaded = AutoModel.from_pretrained(tmp_path / "q")
    assert {n for n, m in reloaded.named_modules() if isinstance(m, QuantizedLinear)} == layers
    assert reloaded.config.quantization_config.quant_method == "lqmod"
    torch.testing.assert_close(logits(reloaded), before, rtol=0, atol=0)


def test_a_plan_mixes_quantizers(dense_dir: Path, tmp_path: Path) -> None:
    plan = {
        "modules": {
            "model.layers.0.self_attn.q_proj": {"quantizer": "nf", "config": {"bits": 3, "blocksize": 32}},
            "model.layers.0.mlp.down_proj": {"quantizer": "rtn", "config": {"bits": 4, "group_size": 32}},
        }
    }
    model = AutoModel.from_pretrained(dense_dir, quantization_config=LqmodConfig(quantizer=None, plan=plan))
    kinds = {n: m.quantizer for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert kinds == {"model.layers.0.self_attn.q_proj": "nf", "model.layers.0.mlp.down_proj": "rtn"}
    before = logits(model)
    model.save_pretrained(tmp_path / "q")
    torch.testing.assert_close(logits(AutoModel.from_pretrained(tmp_path / "q")), before, rtol=0, atol=0)


def test_quantizers_needing_statistics_go_through_quantize_model(dense_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"need calibration statistics.*quantize_model"):
        AutoModel.from_pretrained(
            dense_dir, quantization_config=LqmodConfig(quantizer="optq", config={"group_size": 32})
        )
    model = AutoModel.from_pretrained(dense_dir)
    cfg = LqmodConfig(quantizer="optq", config={"group_size": 32})
    names = list(resolve_entries(model, "optq", None))
    with pytest.raises(ValueError, match="needs calibration statistics"):
        quantize_model(model, cfg)
    report = quantize_model(model, cfg, stats=fake_stats(model, names))
    assert len(report.layers) == 14 and all(r.quantizer == "optq" for r in report.layers)
    before = logits(model)
    model.save_pretrained(tmp_path / "q")
    torch.testing.assert_close(logits(AutoModel.from_pretrained(tmp_path / "q")), before, rtol=0, atol=0)


def test_bad_configs_fail_when_made() -> None:
    with pytest.raises(lqmod.UnknownPluginError, match=r"Choose one of: .*nf"):
        LqmodConfig(quantizer="nope")
    with pytest.raises(ValueError, match="bits"):
        LqmodConfig(quantizer="nf", config={"bits": 5})
    with pytest.raises(ValueError, match="unknown field"):
        LqmodConfig(quantizer="nf", colour="red")


def test_calibration_text_on_load_matches_calibrating_by_hand(dense_dir: Path, tmp_path: Path) -> None:
    """OPTQ needs Hessians: named calibration text is read with the model's tokenizer, the model
    loads dense, and the layers are quantized on Hessians of that text before loading returns."""
    from integ_helpers import save_word_tokenizer

    from lqmod.calibration import collect_hessians, token_windows

    text = save_word_tokenizer(dense_dir)
    cal = {"text": str(text), "n": 4, "length": 16}
    cfg = {"group_size": 32}
    model = AutoModel.from_pretrained(
        dense_dir, quantization_config=LqmodConfig(quantizer="optq", config=cfg, calibration=cal)
    )
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14

    reference = AutoModel.from_pretrained(dense_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(dense_dir)
    paragraphs = [ln for ln in text.read_text().splitlines() if ln.strip()]
    batches = token_windows(tokenizer, "\n\n".join(paragraphs), n=4, length=16)
    names = list(resolve_entries(reference, "optq", None))
    quantize_linears(reference, "optq", cfg, stats=collect_hessians(reference, names, batches, progress=False))
    ref_tensors, got = quantized_tensors(reference), quantized_tensors(model)
    assert ref_tensors.keys() == got.keys()
    for name in got:
        assert torch.equal(got[name], ref_tensors[name]), name

    before = logits(model)
    model.save_pretrained(tmp_path / "q")
    torch.testing.assert_close(logits(AutoModel.from_pretrained(tmp_path / "q")), before, rtol=0, atol=0)


@pytest.mark.slow
def test_sequential_calibration_on_load(dense_dir: Path) -> None:
    from integ_helpers import save_word_tokenizer

    text = save_word_tokenizer(dense_dir)
    cal = {"text": str(text), "n": 4, "length": 16, "sequential": True}
    model = AutoModel.from_pretrained(
        dense_dir, quantization_config=LqmodConfig(quantizer="optq", config={"group_size": 32}, calibration=cal)
    )
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and {m.quantizer for m in layers} == {"optq"}
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    assert torch.isfinite(logits(model)).all()


def test_dequantize_gives_a_plain_dense_model(dense_dir: Path, tmp_path: Path) -> None:
    model = AutoModel.from_pretrained(dense_dir, quantization_config=LqmodConfig(quantizer="nf"))
    before = logits(model)
    dense = model.dequantize()
    assert not any(isinstance(m, QuantizedLinear) for m in dense.modules())
    assert getattr(dense.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(dense), before, rtol=1e-5, atol=1e-5)
    dense.save_pretrained(tmp_path / "dense-again")
    again = AutoModel.from_pretrained(tmp_path / "dense-again")
    torch.testing.assert_close(logits(again), before, rtol=1e-5, atol=1e-5)


def test_bf16_load_save_reload(dense_dir: Path, tmp_path: Path) -> None:
    model = AutoModel.from_pretrained(dense_dir, dtype=torch.bfloat16, quantization_config=LqmodConfig(quantizer="nf"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    layer = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    assert layer.compute_dtype == torch.bfloat16 and layer.base.absmax_scale.dtype == torch.float32
    before = logits(model)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModel.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    torch.testing.assert_close(logits(reloaded), before, rtol=0, atol=0)
