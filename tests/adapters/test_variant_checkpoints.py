"""Checkpoints record each layer's adapter variant and load it back; old checkpoints load as LoRA."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lqmod
import lqmod.io as lio
from lqmod.model import iter_lora_layers, quantize_model


def _quantized(model: nn.Module, adapter: str) -> nn.Module:
    quantize_model(model, "nf", {"blocksize": 32}, lora={"r": 4, "adapter": adapter}, progress=False)
    g = torch.Generator().manual_seed(1)
    for _, layer in iter_lora_layers(model):  # a trained adapter: every parameter moved
        for p in layer.adapter.parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(0))


def _resign(path: Path, manifest: dict[str, Any]) -> None:
    tfile = path / lio.TENSORS
    manifest["files"] = {lio.TENSORS: {"sha256": hashlib.sha256(tfile.read_bytes()).hexdigest(),
                                       "bytes": tfile.stat().st_size}}
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    manifest["integrity"] = {
        "algorithm": "sha256",
        "layers": {n: lio._digest(h) for n, h in body["layers"].items()},
        "manifest": lio._digest(body),
    }
    (path / lio.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("adapter", ["lora", "dora", "iec"])
def test_round_trip_records_the_variant(tiny_llama: nn.Module, tmp_path: Path, adapter: str) -> None:
    model = _quantized(tiny_llama, adapter)
    with torch.no_grad():
        ref = model(_ids()).logits
    lio.save_checkpoint(model, tmp_path / "c")
    manifest = lio.read_manifest(tmp_path / "c")
    assert manifest["version"] == 3 and manifest["lora"]["adapter"] == adapter
    assert {h["adapter"] for h in manifest["layers"].values()} == {adapter}
    reloaded = lio.load_checkpoint(tmp_path / "c")
    layers = dict(iter_lora_layers(reloaded))
    assert len(layers) == len(dict(iter_lora_layers(model)))
    assert {m.adapter_name for m in layers.values()} == {adapter}
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, ref)
    trainable = {n.split(".adapter.", 1)[1] for n, p in reloaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in next(iter(layers.values())).adapter.named_parameters()}


def test_a_version_2_checkpoint_loads_as_lora(tiny_llama: nn.Module, tmp_path: Path) -> None:
    """Rewrite a checkpoint the way lqmod wrote them before variants were recorded (flat
    lora_A / lora_B / base.* / bias tensor names, no adapter fields, version 2)."""
    model = _quantized(tiny_llama, "lora")
    with torch.no_grad():
        ref = model(_ids()).logits
    path = tmp_path / "old"
    lio.save_checkpoint(model, path)
    manifest = json.loads((path / lio.MANIFEST).read_text())
    old = {}
    for key, t in load_file(str(path / lio.TENSORS)).items():
        old[key.replace(".adapter.lora_", ".lora_").replace(".base_layer.", ".")] = t
    assert any(k.endswith(".lora_A") for k in old) and any(".base.codes" in k for k in old)
    lio.write_safetensors(old, path / lio.TENSORS, metadata={"format": "pt", "lqmod": lio.FORMAT})
    manifest["version"] = 2
    for key in ("adapter", "adapter_config"):
        del manifest["lora"][key]
        for header in manifest["layers"].values():
            del header[key]
    _resign(path, manifest)
    reloaded = lio.load_checkpoint(path)
    assert {m.adapter_name for _, m in iter_lora_layers(reloaded)} == {"lora"}
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, ref)


def test_an_unknown_variant_lists_the_registered_ones(tiny_llama: nn.Module, tmp_path: Path) -> None:
    lio.save_checkpoint(_quantized(tiny_llama, "lora"), tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / lio.MANIFEST).read_text())
    next(iter(manifest["layers"].values()))["adapter"] = "no-such-variant"
    _resign(tmp_path / "c", manifest)
    with pytest.raises(lqmod.UnknownPluginError, match=r"unknown adapter 'no-such-variant'. Choose one of: .*dora"):
        lio.load_checkpoint(tmp_path / "c")


def test_a_damaged_adapter_is_refused_naming_the_layer(tiny_llama: nn.Module, tmp_path: Path) -> None:
    model = _quantized(tiny_llama, "dora")
    name, layer = next(iter(iter_lora_layers(model)))
    magnitude = layer.adapter.get_parameter("magnitude")
    magnitude.data[0] = float("nan")
    lio.save_checkpoint(model, tmp_path / "c")
    with pytest.raises(lio.CheckpointError, match=rf"layer '{name}': adapter tensor 'magnitude'.*non-finite"):
        lio.load_checkpoint(tmp_path / "c")
