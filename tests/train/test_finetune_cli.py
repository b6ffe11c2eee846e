"""``lqmod quantize`` then ``lqmod finetune`` on a tiny local causal LM, end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lqmod.cli import main

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

pytest.importorskip("transformers")


@pytest.fixture
def quantized_dir(tiny_llama: LlamaForCausalLM, word_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> Path:
    src = tmp_path / "tiny"
    tiny_llama.save_pretrained(src)
    word_tokenizer.save_pretrained(src)
    assert main(["quantize", str(src), "--config", "bits=4,blocksize=32", "--rank", "4", "--out",
                 str(tmp_path / "q")]) == 0
    return tmp_path / "q"


@pytest.mark.slow
def test_finetune_jsonl_with_eval_checkpoints_and_resume(
    quantized_dir: Path, train_text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sentences = [s.strip() for s in train_text.split(" . ") if s.strip()]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"prompt": s, "completion": s + " ."}) for s in sentences))
    held = tmp_path / "held.txt"
    held.write_text(train_text[::-1])
    common = [str(quantized_dir), "--train", str(train), "--eval", str(held), "--eval-windows", "2",
              "--seq-len", "16", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--warmup", "1",
              "--eval-every", "2", "--save-every", "2", "--no-progress"]
    out = tmp_path / "ft"
    assert main(["finetune", *common, "--steps", "2", "--out", str(out)]) == 0
    run = tmp_path / "ft.run"
    assert (run / "states" / "step-000002" / "state.json").is_file() and (run / "loss_curve.png").is_file()
    # The same --out again is refused before any training starts.
    assert main(["finetune", *common, "--steps", "2", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().out
    # A longer run with other steps is another schedule: resuming it is refused, not mixed.
    assert main(["finetune", *common, "--steps", "4", "--out", str(out), "--overwrite", "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().out
    manifest = json.loads((out / "lqmod.json").read_text())
    evals = manifest["extra"]["finetune"]["evals"]
    assert [e["step"] for e in evals] == [0, 2] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert main(["eval", "--checkpoint", str(out), "--text", str(held), "--context", "16", "--no-progress"]) == 0


def test_finetune_refuses_training_on_the_eval_text(quantized_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["finetune", str(quantized_dir), "--train", "ptb", "--eval", "ptb", "--out",
                 str(quantized_dir.parent / "x"), "--no-progress"]) == 2
    assert "is the training text" in capsys.readouterr().out
    assert main(["finetune", str(quantized_dir), "--steps", "0", "--out", str(quantized_dir.parent / "x")]) == 2
    assert "steps" in capsys.readouterr().out
