"""``lqmod export --format gptq+peft`` from both sources, its one-line errors, and ``lqmod plugins``
listing disabled plug-ins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from integ_helpers import tiny_llama
from serving_helpers import dense_from_gptq, lqmod_logits, lqmod_native, peft_over_lqmod, tiny_tokenizer

import lqmod
from lqmod.cli import main
from lqmod.io import load_checkpoint, save_checkpoint
from lqmod.model import quantize_model

peft = pytest.importorskip("peft")
torch.set_num_threads(1)
TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def source_model(tmp_path: Path) -> Path:
    """A model directory with a tokenizer: what a checkpoint records as its source model."""
    folder = tmp_path / "source"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr().out.strip()
    assert out.startswith("error:") and "\n" not in out, out
    return out


def test_export_lqmod_checkpoint(
    tmp_path: Path, source_model: Path, ids: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(lqmod_native(), ckpt, extra={"source_model": str(source_model)})
    model = load_checkpoint(ckpt)
    out = tmp_path / "serve"
    assert main(["export", str(ckpt), "--format", "gptq+peft", "--out", str(out)]) == 0
    assert "layers as gptq" in capsys.readouterr().out
    assert (out / "base" / "tokenizer.json").is_file()  # from the checkpoint's source model
    served = peft.PeftModel.from_pretrained(dense_from_gptq(out / "base"), out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, lqmod_logits(model, ids), **TOL)

    assert main(["export", str(ckpt), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in _error_line(capsys)
    argv = [
        "export",
        str(ckpt),
        "--out",
        str(out),
        "--overwrite",
        "--checkpoint-format",
        "gptq_v2",
        "--no-fold-scaling",
    ]
    assert main(argv) == 0
    assert json.loads((out / "base" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 8


def test_export_transformers_dir_with_adapter(
    tmp_path: Path, source_model: Path, ids: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    pm = peft_over_lqmod(tmp_path)
    expected = lqmod_logits(pm, ids)
    pm.save_pretrained(tmp_path / "adapter")
    pm.unload().save_pretrained(tmp_path / "base-optq")  # the "lqmod" transformers method
    out = tmp_path / "serve"
    argv = ["export", str(tmp_path / "base-optq"), "--out", str(out), "--tokenizer", str(source_model)]
    assert main(argv) == 2
    assert "pass its PEFT adapter with --adapter" in _error_line(capsys)
    assert main([*argv, "--adapter", str(tmp_path / "adapter")]) == 0
    served = peft.PeftModel.from_pretrained(dense_from_gptq(out / "base"), out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, expected, **TOL)


def test_export_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_llama()
    quantize_model(model, "nf", {}, progress=False)
    ckpt = tmp_path / "nf"
    save_checkpoint(model, ckpt)
    out = str(tmp_path / "serve")
    assert main(["export", str(ckpt), "--out", out]) == 2
    line = _error_line(capsys)
    assert "quantized with optq only" in line and "use nf" in line
    assert main(["export", str(ckpt), "--format", "awq+peft", "--out", out]) == 2
    assert "--format 'awq+peft' is not one of: gptq+peft" in _error_line(capsys)
    assert main(["export", str(tmp_path), "--out", out]) == 2
    assert "neither an lqmod checkpoint" in _error_line(capsys)
    assert main(["export", str(ckpt), "--adapter", str(tmp_path), "--out", out]) == 2
    assert "holds its adapters" in _error_line(capsys)
    assert not Path(out).exists()


def test_plugins_lists_disabled(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LQMOD_DISABLE_PLUGINS", "greedy")
    lqmod.plugins.get_registry(reload=True)
    try:
        assert main(["plugins"]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if "greedy" in line)
        assert "disabled" in row and "LQMOD_DISABLE_PLUGINS" in row
    finally:
        monkeypatch.delenv("LQMOD_DISABLE_PLUGINS")
        lqmod.plugins.get_registry(reload=True)
