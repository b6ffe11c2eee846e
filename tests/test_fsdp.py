"""FSDP2 over lqmod quantized bases: the tensor subclass's ops, and 2 gloo processes that each
hold half of the quantized base yet train the adapters one process trains."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import cast

import pytest
import torch

pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fsdp_worker", WORKER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _qweight() -> object:
    import lqmod
    from lqmod.quantize import quantize_weight

    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    return quantize_weight(lqmod.get_registry().quantizer("nf"), w, {"bits": 3, "blocksize": 32})


def test_shards_of_any_layout_gather_back_to_the_weight() -> None:
    from lqmod.fsdp import ShardedQuantizedTensor

    qw = _qweight()
    t = ShardedQuantizedTensor.from_qweight(qw)  # type: ignore[arg-type]
    assert t.shape == (12, 64) and t.is_whole
    for world in (2, 3, 4):
        chunks = cast(tuple[ShardedQuantizedTensor, ...], torch.chunk(t, world, dim=0))  # what fully_shard does
        assert [c.shape[0] for c in chunks] == [12 // world] * world
        assert not chunks[0].is_whole
        with pytest.raises(RuntimeError, match="one FSDP shard"):
            chunks[0].qweight()
        pad = cast(ShardedQuantizedTensor, t.new_zeros(chunks[0].shape))
        pad.narrow(0, 0, chunks[0].shape[0]).copy_(chunks[1])
        assert all(torch.equal(a, b) for a, b in zip(pad.parts, chunks[1].parts, strict=True))
        assert pad.view(-1).shape == (12 // world * 64,)
        # An all-gather concatenates every rank's piece of each inner tensor.
        gathered = tuple(torch.cat([c.parts[i] for c in chunks]) for i in range(len(t.parts)))
        full, _ = chunks[0].fsdp_post_all_gather(gathered, None, torch.float32)
        back = full.qweight()
        for name, x in qw.tensors.items():  # type: ignore[attr-defined]
            assert torch.equal(back.tensors[name], x), name
    with pytest.raises(NotImplementedError, match="equal parts"):
        torch.split(t, 5, dim=0)  # 5 + 5 + 2 rows
    with pytest.raises(NotImplementedError, match="is not defined on a quantized weight"):
        torch.mm(t, torch.ones(64, 2))


def test_make_bases_shardable_keeps_the_layer(tiny_llama: torch.nn.Module) -> None:
    from lqmod.fsdp import make_bases_shardable
    from lqmod.model import quantize_model

    quantize_model(tiny_llama, "nf", {"bits": 4, "blocksize": 32}, lora={"r": 4, "alpha": 8}, progress=False)
    x = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        before = tiny_llama(x).logits
        assert make_bases_shardable(tiny_llama) == 14
        assert torch.equal(tiny_llama(x).logits, before)
    with pytest.raises(ValueError, match="no lqmod quantized layers"):
        make_bases_shardable(torch.nn.Linear(2, 2))


def test_fully_shard_on_two_processes_halves_the_base_and_trains_alike(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
           str(out), "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out.with_suffix(".json").read_text())
    w = _worker()
    model = w.build()
    whole = sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype in (torch.uint8, torch.float32)
                and b.ndim == 1 and b.numel() > 1)
    losses = w.train(model, 3, 0, 1)
    # Each process holds half of every quantized tensor (plus at most one padding element each).
    assert all(h <= whole // 2 + 4 * 14 * 8 for h in info["held"]), (info["held"], whole)
    assert info["losses_sum"] == pytest.approx(sum(losses), rel=1e-6)
    got = load_file(str(out.with_suffix(".safetensors")))
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Same sums over another split of the batch: float32 order only (see tests/train/test_distributed.py).
            torch.testing.assert_close(got[name], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
