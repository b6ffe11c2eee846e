"""Streamed quantization: the same checkpoint, byte for byte, as the in-memory path, from
sharded safetensors; and a model several times larger than the memory the step uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from lqmod.io import load_checkpoint, read_manifest, save_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

FILES = ("model.safetensors", "lqmod.json")


def _tiny(tmp_path: Path, tie: bool) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    src = tmp_path / f"tiny-tie{tie}"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="20KB")  # many shards
    assert len(list(src.glob("*.safetensors"))) > 5
    return src


def _same(a: Path, b: Path) -> None:
    for f in FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def _in_memory(src: Path) -> torch.nn.Module:
    # What lqmod.hf.load_local_model builds (these directories hold no tokenizer).
    model: torch.nn.Module = transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, use_safetensors=True
    )
    return model.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_streamed_checkpoint_is_the_in_memory_one(tmp_path: Path, tie: bool) -> None:
    from lqmod.model import quantize_model
    from lqmod.streaming import quantize_pretrained_streamed

    src = _tiny(tmp_path, tie)
    kw: dict[str, Any] = {"config": {"bits": 4, "blocksize": 32}, "lora": {"r": 4, "alpha": 8}, "seed": 3}
    model = _in_memory(src)
    want = quantize_model(model, "nf", progress=False, **kw)
    save_checkpoint(model, tmp_path / "mem", extra={"source_model": "tiny"})
    got = quantize_pretrained_streamed(src, "nf", out=tmp_path / "str", extra={"source_model": "tiny"},
                                       progress=False, **kw)
    _same(tmp_path / "mem", tmp_path / "str")
    assert [r.name for r in got.layers] == [r.name for r in want.layers]
    assert [r.rel_error for r in got.layers] == [r.rel_error for r in want.layers]
    manifest = read_manifest(tmp_path / "str")
    assert ("lm_head.weight" in manifest["aliases"]) is tie
    x = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "str")(x).logits, model(x).logits)


def test_streamed_sequential_calibration_is_the_in_memory_one(tmp_path: Path) -> None:
    from lqmod.calibration import quantize_model_sequential
    from lqmod.streaming import quantize_pretrained_streamed

    src = _tiny(tmp_path, tie=False)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 101, (2, 16), generator=gen)} for _ in range(2)]
    kw: dict[str, Any] = {"config": {"bits": 3, "group_size": 32}, "lora": {"r": 4, "alpha": 8}}
    model = _in_memory(src)
    quantize_model_sequential(model, "optq", batches=batches, progress=False, **kw)
    save_checkpoint(model, tmp_path / "mem")
    quantize_pretrained_streamed(src, "optq", out=tmp_path / "str", batches=batches, progress=False, **kw)
    _same(tmp_path / "mem", tmp_path / "str")


def test_streamed_refusals(tmp_path: Path) -> None:
    from lqmod.streaming import quantize_pretrained_streamed

    src = _tiny(tmp_path, tie=False)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        quantize_pretrained_streamed(src, "optq", {"group_size": 32}, out=tmp_path / "x", progress=False)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 101, (1, 8), generator=gen)}]
    with pytest.raises(ValueError, match="outside the transformer blocks and need Hessians"):
        quantize_pretrained_streamed(src, "optq", {"group_size": 32}, out=tmp_path / "x", batches=batches,
                                     targets={"include": [".*"], "exclude": []}, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        quantize_pretrained_streamed(empty, out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    # A file of another model: a tensor the skeleton has is missing from the files.
    cut = tmp_path / "cut"
    cut.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (cut / "config.json").write_text(json.dumps(cfg))
    for f in src.glob("*.safetensors"):
        (cut / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="files lack"):
        quantize_pretrained_streamed(cut, out=tmp_path / "x", progress=False)


def test_cli_stream_writes_what_quantize_writes(tmp_path: Path, word_tokenizer: PreTrainedTokenizerFast) -> None:
    from lqmod.cli import main

    src = _tiny(tmp_path, tie=True)
    word_tokenizer.save_pretrained(src)
    common = ["quantize", str(src), "--config", "bits=4,blocksize=32", "--rank", "4"]
    assert main([*common, "--out", str(tmp_path / "mem")]) == 0
    assert main([*common, "--stream", "--out", str(tmp_path / "str")]) == 0
    _same(tmp_path / "mem", tmp_path / "str")
    assert main([*common, "--stream", "--quantizer", "optq", "--config", "group_size=32",
                 "--out", str(tmp_path / "o")]) == 2  # calibrated without --sequential: refused
    seq = ["quantize", str(src), "--quantizer", "optq", "--config", "bits=3,group_size=32", "--rank", "4",
           "--sequential", "--calib-text", "ptb", "--n-calib", "2", "--calib-seq-len", "16"]
    assert main([*seq, "--out", str(tmp_path / "seq-mem")]) == 0
    assert main([*seq, "--stream", "--out", str(tmp_path / "seq-str")]) == 0
    _same(tmp_path / "seq-mem", tmp_path / "seq-str")


@pytest.mark.slow
def test_streamed_quantization_of_a_model_larger_than_its_memory(tmp_path: Path) -> None:
    """A synthetic Llama of 336 MiB float32 quantized while the step adds well under a third of
    that to the process's peak resident set (measured in a fresh process: getrusage's peak
    minus the resident set after every import). What remains is one layer's dense weight and
    the NF quantizer's temporaries for it (~10x the weight), not the model."""
    from lqmod.bench.synthetic import SyntheticLlama, write_synthetic_llama

    spec = SyntheticLlama(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=12, vocab=2048)
    src = write_synthetic_llama(tmp_path / "syn", spec)
    fp32_mib = spec.fp32_bytes / 2**20
    assert fp32_mib > 320
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lqmod.bench.peak_rss", str(src), str(tmp_path / "q"), "--mode", "stream",
           "--config", "bits=4,blocksize=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["layers"] == 7 * spec.layers
    assert row["step_mib"] < fp32_mib / 3, row
    manifest = read_manifest(tmp_path / "q")  # hashes checked: the checkpoint is whole
    assert len(manifest["layers"]) == 7 * spec.layers
