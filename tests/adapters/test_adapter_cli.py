"""Choosing a variant: LoRAConfig.adapter, lqmod quantize/finetune --adapter, lqmod plugins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lqmod.io as lio
from lqmod.cli import main
from lqmod.model import convert_adapters, iter_lora_layers, quantize_model


def test_plugins_lists_the_adapters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "adapter" in line]
    for name in ("lora", "dora", "iec"):
        assert any(f" {name} " in row for row in rows), f"{name} missing from {rows}"


def test_an_unknown_adapter_is_refused_before_any_work(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["quantize", str(tmp_path / "no-model"), "--adapter", "dorra", "--out", str(tmp_path / "q")]) == 2
    out = capsys.readouterr().out
    assert "unknown adapter 'dorra'. Choose one of: dora, iec, lora" in out
    assert main(["quantize", "x", "--adapter", "iec", "--adapter-config", "beta=1", "--out", str(tmp_path / "q")]) == 2
    assert "field 'beta'" in capsys.readouterr().out
    assert not (tmp_path / "q").exists()


def test_quantize_with_dora_writes_dora_layers(minilm_dir: str, tmp_path: Path) -> None:
    assert main(["quantize", "minilm", "--config", "bits=4", "--rank", "4", "--adapter", "dora",
                 "--out", str(tmp_path / "q")]) == 0
    layers = lio.read_manifest(tmp_path / "q")["layers"]
    assert len(layers) == 37 and {h["adapter"] for h in layers.values()} == {"dora"}


def test_quantize_refuses_an_iec_rank_that_does_not_fit(
    capsys: pytest.CaptureFixture[str], minilm_dir: str, tmp_path: Path
) -> None:
    assert main(["quantize", "minilm", "--rank", "5", "--adapter", "iec", "--out", str(tmp_path / "q")]) == 2
    out = capsys.readouterr().out
    assert "iec adapter: rank r=5 does not divide" in out and "ranks that fit" in out
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("adapter", ["dora", "iec"])
def test_convert_adapters_keeps_the_function(tiny_llama: nn.Module, adapter: str) -> None:
    quantize_model(tiny_llama, "nf", {"blocksize": 32}, lora={"r": 4}, progress=False)
    g = torch.Generator().manual_seed(1)
    for _, layer in iter_lora_layers(tiny_llama):  # a trained LoRA adapter
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny_llama(ids).logits
    bases = {n: m.base for n, m in iter_lora_layers(tiny_llama)}
    names = convert_adapters(tiny_llama, adapter)
    assert len(names) == 14
    layers = dict(iter_lora_layers(tiny_llama))
    assert {m.adapter_name for m in layers.values()} == {adapter}
    assert all(layers[n].base is bases[n] for n in names), "the quantized base must be shared, not copied"
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for m in layers.values() for p in m.adapter.parameters())
    with pytest.raises(ValueError, match=r"only plain LoRA adapters convert"):
        convert_adapters(tiny_llama, "dora" if adapter == "iec" else "iec")


@pytest.mark.slow
def test_finetune_trains_a_lora_checkpoint_as_dora(minilm_dir: str, tmp_path: Path) -> None:
    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"sentence number {i} is about a film , a song and a book ." for i in range(64)))
    assert main(["quantize", "minilm", "--config", "bits=4,blocksize=64", "--rank", "4",
                 "--out", str(tmp_path / "q")]) == 0
    assert main(["finetune", str(tmp_path / "q"), "--base", "minilm", "--text", str(text), "--steps", "2",
                 "--batch-size", "8", "--adapter", "dora", "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    layers = lio.read_manifest(tmp_path / "ft")["layers"]
    assert {h["adapter"] for h in layers.values()} == {"dora"}
    model = lio.load_checkpoint(tmp_path / "ft")
    moved = [m for _, m in iter_lora_layers(model) if bool(m.lora_B.detach().abs().max() > 0)]
    assert moved, "the DoRA adapters did not train"
    assert main(["export-peft", str(tmp_path / "ft"), "--out", str(tmp_path / "peft")]) == 0
