"""Checkpoints: self-contained, bit-identical on reload, refused when damaged, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lqmod.io as lio
import lqmod.io.tensor_files as tensor_files
from lqmod.model import iter_lora_layers, quantize_model


def _trained(model: torch.nn.Module) -> torch.nn.Module:
    quantize_model(model, "nf", {"blocksize": 32}, lora={"r": 4}, progress=False)
    g = torch.Generator().manual_seed(1)
    for _, layer in iter_lora_layers(model):  # non-zero B, as after training
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_round_trip_gives_identical_logits(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = _trained(request.getfixturevalue(fixture))
    with torch.no_grad():
        ref = model(_ids()).logits
    lio.save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["lqmod.json", "model.safetensors"]
    reloaded = lio.load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        out = reloaded(_ids()).logits
    assert torch.equal(ref, out)
    trainable = {n.rsplit(".", 1)[-1] for n, p in reloaded.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def test_checkpoint_holds_no_pickle(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    lio.save_checkpoint(_trained(tiny_llama), tmp_path / "c")
    data = (tmp_path / "c" / "model.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert all(v["dtype"] in {"F32", "U8", "I64", "BOOL"} for k, v in header.items() if k != "__metadata__")
    manifest = json.loads((tmp_path / "c" / "lqmod.json").read_text())
    assert manifest["format"] == "lqmod-checkpoint" and manifest["layers"]


def test_truncated_checkpoint_is_refused(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    lio.save_checkpoint(_trained(tiny_llama), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(lio.CheckpointError, match="truncated"):
        lio.load_checkpoint(tmp_path / "c")


def test_corrupted_checkpoint_is_refused(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    lio.save_checkpoint(_trained(tiny_llama), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(lio.CheckpointError, match="SHA-256"):
        lio.load_checkpoint(tmp_path / "c")


def test_missing_and_foreign_directories(tmp_path: Path) -> None:
    with pytest.raises(lio.CheckpointError, match="not found"):
        lio.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lio.CheckpointError, match="not an lqmod checkpoint"):
        lio.load_checkpoint(tmp_path / "empty")


def test_existing_target_needs_overwrite(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    model = _trained(tiny_llama)
    lio.save_checkpoint(model, tmp_path / "c")
    with pytest.raises(FileExistsError, match="overwrite"):
        lio.save_checkpoint(model, tmp_path / "c")
    lio.save_checkpoint(model, tmp_path / "c", overwrite=True)
    assert lio.read_manifest(tmp_path / "c")


def test_failed_save_leaves_nothing_half_written(
    tiny_llama: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _trained(tiny_llama)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tensor_files, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lio.save_checkpoint(model, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(
    tiny_llama: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _trained(tiny_llama)
    lio.save_checkpoint(model, tmp_path / "c")
    before = (tmp_path / "c" / "lqmod.json").read_text()
    monkeypatch.setattr(tensor_files, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        lio.save_checkpoint(model, tmp_path / "c", overwrite=True)
    assert (tmp_path / "c" / "lqmod.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_peft_export_applies_to_the_dequantized_base(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = _trained(tiny_llama)
    with torch.no_grad():
        ours = model(_ids()).logits
    lio.export_peft(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    base = lio.dequantized_copy(model)
    assert not list(iter_lora_layers(base))
    with_peft = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = with_peft(_ids()).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_peft_export_for_conv1d_models(tiny_gpt2: torch.nn.Module, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = _trained(tiny_gpt2)
    with torch.no_grad():
        ours = model(_ids()).logits
    lio.export_peft(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with_peft = peft.PeftModel.from_pretrained(lio.dequantized_copy(model), str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = with_peft(_ids()).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
