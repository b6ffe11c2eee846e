"""Data-parallel finetuning on 2 CPU processes (gloo): same adapters as one process, rank-0-only
files, resume, and a dead or stalled rank failing the job instead of hanging it.

Tolerance of the equivalence: the two runs compute the same sums in another order. Each
process scales its loss by N=2 (exact in binary) and DDP divides the summed gradient by 2
(exact), so with the split used here (one process: micro-batches [w0 w1] [w2 w3]; two: [w0
w1] on rank 0, [w2 w3] on rank 1) every float32 operation is the same and the adapters come
out bit-identical (asserted). Against one process that runs the 4 windows as one
micro-batch, matmuls of 4 rows instead of 2 block their float32 dot products differently
(~1e-7 relative per gradient element). AdamW's update lr * m / (sqrt(v) + eps) is
scale-free where |g| >> eps, so almost every element agrees to ~1e-6 relative (asserted:
the median to 1e-5); but an element whose gradient is comparable to eps = 1e-8 moves by
~lr * dg / eps, a visible fraction of one step's lr-sized update (measured: one element of
28 tensors, 1.6e-5 after 3 steps at lr 1e-2). The element-wise bound is therefore 1% of the
largest total update, lr * steps, far below any real divergence (a wrong normalisation or a
missing rank changes the adapters by O(lr) everywhere).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, **extra}


def _torchrun(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORCHRUN, str(WORKER), *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(**env))


def _single(steps: int, **update: object) -> tuple[dict[str, torch.Tensor], list[float]]:
    from lqmod.train import train_causal_lm

    w = _worker()
    torch.manual_seed(0)
    model = w.build()
    result = train_causal_lm(model, w.data(), w.config(steps).model_copy(update=update), progress=False)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, result.losses


def _load(path: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    from safetensors.torch import load_file

    got = load_file(str(path))
    return {k: v for k, v in got.items() if k != "losses"}, got["losses"].tolist()


def test_two_processes_train_the_adapters_one_process_does(tmp_path: Path) -> None:
    out = tmp_path / "two.safetensors"
    proc = _torchrun([str(out), "3"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, two_losses = _load(out)
    one, one_losses = _single(3)
    assert set(two) == set(one) and len(two) == 28  # 14 adapted layers x (A, B)
    for name, t in one.items():
        # Same float32 operations: bit-identical (module docstring).
        assert torch.equal(two[name], t), (name, float((two[name] - t).abs().max()))
    assert two_losses == pytest.approx(one_losses, rel=1e-12)
    assert any(bool((t != 0).any()) for n, t in two.items() if n.endswith("lora_B"))  # it trained
    # Against one process running the whole batch in one micro-batch: the same up to float32 order.
    big, big_losses = _single(3, micro_batch_size=4, grad_accum=1)
    lr, steps = 1e-2, 3
    rel = torch.cat([((two[n] - t).abs() / t.abs().clamp_min(1e-6)).flatten() for n, t in big.items()])
    worst = max(float((two[n] - t).abs().max()) for n, t in big.items())
    assert float(rel.median()) < 1e-5 and worst < 0.01 * lr * steps, (float(rel.median()), worst)
    assert two_losses == pytest.approx(big_losses, rel=1e-5)


def test_a_killed_rank_fails_the_job_and_the_run_resumes(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "two.safetensors"
    t0 = time.monotonic()
    proc = _torchrun([str(out), "4", "1", "2", "kill"], timeout=300, WORKER_RUN_DIR=str(run))
    took = time.monotonic() - t0
    assert proc.returncode != 0 and not out.exists()
    log = proc.stdout + proc.stderr
    # torchrun's agent names the dead worker; the survivor says what failed and why.
    assert "SIGKILL" in log and "rank      : 1" in log, log[-3000:]
    assert "DistributedError" in log or "SIGTERM" in log, log[-3000:]
    assert took < 240, f"the job took {took:.0f} s to fail"
    states = sorted(p.name for p in (run / "states").iterdir())
    assert states[-1] == "step-000002", states  # rank 0 saved before rank 1 died
    proc = _torchrun([str(out), "4"], timeout=300, WORKER_RUN_DIR=str(run), WORKER_RESUME="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, _ = _load(out)
    one, one_losses = _single(4)
    for name, t in one.items():
        assert torch.equal(resumed[name], t), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Rank 0 alone writes the log: one row a step, the resumed steps replacing nothing twice.
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx(one_losses, rel=1e-12)


@pytest.mark.slow
def test_a_stalled_rank_fails_the_other_after_the_timeout(tmp_path: Path) -> None:
    """No torchrun agent here (plain processes): the process-group timeout alone ends the wait."""
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 500), WORLD_SIZE="2",
               LQMOD_DIST_TIMEOUT="10")
    args = [sys.executable, str(WORKER), str(tmp_path / "x.safetensors"), "6", "1", "2", "stall"]
    stalled = subprocess.Popen(args, env={**env, "RANK": "1", "LOCAL_RANK": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        proc = subprocess.run(args, env={**env, "RANK": "0", "LOCAL_RANK": "0"}, capture_output=True, text=True,
                              timeout=300)
        took = time.monotonic() - t0
    finally:
        stalled.kill()
        stalled.wait()
    assert proc.returncode != 0
    assert "DistributedError: rank 0 of 2" in proc.stderr and "10 s timeout" in proc.stderr, proc.stderr[-2000:]
    assert took < 200


def test_rank_share_splits_the_global_batch() -> None:
    from lqmod.train import FinetuneConfig, step_windows
    from lqmod.train.distributed import DistContext, rank_share

    cfg = FinetuneConfig(steps=1, micro_batch_size=3, grad_accum=4, seq_len=16)
    micro = step_windows(0, 50, cfg)
    flat = torch.cat(micro).tolist()
    shares = [rank_share(micro, 3, DistContext(rank=r, world_size=4)) for r in range(4)]
    assert [torch.cat(s).tolist() for s in shares] == [flat[0:3], flat[3:6], flat[6:9], flat[9:12]]
    uneven = [rank_share(micro, 2, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert [[len(m) for m in s] for s in uneven] == [[2, 2]] * 3
    with pytest.raises(ValueError, match="cannot be split evenly over 5 processes"):
        rank_share(micro, 3, DistContext(rank=0, world_size=5))


def test_one_process_sets_nothing_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from lqmod.train.distributed import init_distributed

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed()
    monkeypatch.setenv("LQMOD_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="LQMOD_DIST_TIMEOUT"):
        init_distributed()


@pytest.mark.slow
def test_torchrun_lqmod_finetune(
    tiny_llama: LlamaForCausalLM, word_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    from lqmod.cli import main

    src = tmp_path / "tiny"
    tiny_llama.save_pretrained(src)
    word_tokenizer.save_pretrained(src)
    assert main(["quantize", str(src), "--config", "bits=4,blocksize=32", "--rank", "4", "--out",
                 str(tmp_path / "q")]) == 0
    text = tmp_path / "train.txt"
    text.write_text(" ".join(["the quick brown fox"] * 200))
    held = tmp_path / "held.txt"
    held.write_text(" ".join(["the lazy dog sleeps"] * 50))
    out = tmp_path / "ft"
    cmd = [*TORCHRUN, "-m", "lqmod", "finetune", str(tmp_path / "q"), "--train", str(text), "--eval", str(held),
           "--eval-windows", "3", "--seq-len", "16", "--batch-size", "2", "--grad-accum", "2", "--steps", "2",
           "--save-every", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and "over 2 processes" in proc.stdout  # rank 0 alone reports
    manifest = json.loads((out / "lqmod.json").read_text())
    assert manifest["extra"]["finetune"]["world_size"] == 2
    rows = [json.loads(line) for line in (tmp_path / "ft.run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 2]  # eval, two steps, eval: written once each
    assert rows[-1]["eval_tokens"] == 3 * 15


@pytest.mark.slow
def test_accelerate_launch_trains_the_same_adapters(tmp_path: Path) -> None:
    """accelerate's multi-process launcher is torchrun underneath (its CPU one needs MPI):
    ``--multi_gpu`` on a machine without CUDA starts 2 processes that pick gloo."""
    pytest.importorskip("accelerate")
    out = tmp_path / "acc.safetensors"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29900 + os.getpid() % 90), str(WORKER), str(out), "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, _ = _load(out)
    one, _ = _single(3)
    for name, t in one.items():
        assert torch.equal(two[name], t), name
