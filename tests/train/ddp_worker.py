"""A data-parallel finetuning worker for the distributed tests (run by torchrun or by hand).

``python ddp_worker.py OUT STEPS [RANK STEP kill|stall]``: trains the tiny quantized Llama
of :func:`build` on :func:`data` and, on rank 0, writes the adapters to ``OUT`` (safetensors).
With ``RANK STEP kill`` that rank SIGKILLs itself after that step, as a crashed machine
would; with ``stall`` it stops answering (sleeps), as a hung one would. ``$WORKER_RUN_DIR``
gives the run a directory (states every step); ``$WORKER_RESUME=1`` resumes it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from lqmod.train import FinetuneConfig, PackedData, StepInfo, train_causal_lm

WINDOWS, SEQ = 24, 16


def build() -> torch.nn.Module:
    """The tests' tiny random Llama, NF4-quantized with rank-4 adapters (no dropout: the masks
    of two processes cannot be those of one)."""
    import transformers

    from lqmod.model import quantize_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    quantize_model(model, "nf", {"bits": 4, "blocksize": 32}, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                   progress=False)
    return model


def data() -> PackedData:
    """Random windows, a third of them with their first 7 labels masked: unequal token counts
    per window, so a per-process mean of means would differ from the global mean."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 101, (WINDOWS, SEQ), generator=gen)
    labels = ids.clone()
    labels[::3, :7] = -100
    return PackedData(ids, labels, "random")


def config(steps: int) -> FinetuneConfig:
    # A global batch of 4 windows: one process runs 2 x 2 (micro x accum), two run 2 x 1 each.
    return FinetuneConfig(steps=steps, micro_batch_size=2, grad_accum=2, seq_len=SEQ, lr=1e-2, warmup_steps=0,
                          dist_timeout_s=float(os.environ.get("LQMOD_DIST_TIMEOUT", "60")))


def main(argv: list[str]) -> int:
    from safetensors.torch import save_file

    out, steps = argv[0], int(argv[1])
    kill_rank, kill_step = (int(argv[2]), int(argv[3])) if len(argv) > 3 else (-1, -1)
    mode = argv[4] if len(argv) > 4 else "kill"
    rank = int(os.environ.get("RANK", "0"))

    def maybe_die(info: StepInfo) -> None:
        if rank == kill_rank and info.step == kill_step:
            if mode == "stall":
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)

    model = build()
    run_dir = os.environ.get("WORKER_RUN_DIR") or None
    cfg = config(steps).model_copy(update={"save_every": 1} if run_dir else {})
    result = train_causal_lm(model, data(), cfg, progress=False, callbacks=[maybe_die], run_dir=run_dir,
                             resume=os.environ.get("WORKER_RESUME") == "1")
    if rank == 0:
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        tensors["losses"] = torch.tensor(result.losses, dtype=torch.float64)
        save_file(tensors, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
