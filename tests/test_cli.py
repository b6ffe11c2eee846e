"""The command line, end to end on the real MiniLM weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lqmod.cli import main, parse_kv


def test_parse_kv() -> None:
    assert parse_kv("bits=4,blocksize=64,double_quant=false,name=x") == {
        "bits": 4, "blocksize": 64, "double_quant": False, "name": "x",
    }
    with pytest.raises(ValueError, match="not key=value"):
        parse_kv("bits")


def test_plugins_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "nf" in out and "default" in out and "lqmod" in out


def test_bad_config_is_one_clear_line(capsys: pytest.CaptureFixture[str], minilm_dir: str, tmp_path: Path) -> None:
    assert main(["quantize", "minilm", "--config", "bits=5", "--out", str(tmp_path / "q")]) == 2
    out = capsys.readouterr().out
    assert "field 'bits' = 5" in out and "2, 3 or 4" in out
    assert not (tmp_path / "q").exists()


def test_unknown_quantizer_and_missing_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["quantize", str(tmp_path / "no-model"), "--out", str(tmp_path / "q")]) == 2
    assert "not found" in capsys.readouterr().out
    assert main(["quantize", "minilm", "--quantizer", "nf9", "--out", str(tmp_path / "q")]) == 2
    assert "Choose one of" in capsys.readouterr().out


@pytest.mark.slow
def test_quantize_finetune_export(minilm_dir: str, tmp_path: Path) -> None:
    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"sentence number {i} is about a film , a song and a book ." for i in range(64)))
    assert main(["quantize", "minilm", "--config", "bits=4,blocksize=64", "--rank", "4",
                 "--out", str(tmp_path / "q")]) == 0
    assert main(["finetune", str(tmp_path / "q"), "--base", "minilm", "--text", str(text), "--steps", "3",
                 "--batch-size", "8", "--out", str(tmp_path / "ft")]) == 0
    assert main(["export-peft", str(tmp_path / "ft"), "--out", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and len(cfg["target_modules"]) == 37
