"""FSDP2 over lqmod's quantized bases on 2 gloo processes (run by torchrun from tests/test_fsdp.py).

``python fsdp_worker.py OUT STEPS``: builds the tiny NF4 Llama, makes its bases shardable,
``fully_shard``s each decoder layer and the root, trains ``STEPS`` AdamW steps on this
rank's half of each batch (loss scaled to the global token count), and on rank 0 writes
the adapters, the losses and each rank's quantized bytes to ``OUT`` (JSON + safetensors).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from lqmod.evaluation.perplexity import token_nll


def build() -> torch.nn.Module:
    import transformers

    from lqmod.model import quantize_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    quantize_model(model, "nf", {"bits": 4, "blocksize": 32}, lora={"r": 4, "alpha": 8}, progress=False)
    return model


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(100 + step))


def train(model: torch.nn.Module, steps: int, rank: int, world: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        x = batch(step)
        n = int(x[:, 1:].numel())
        mine = x.chunk(world)[rank]
        nll, _ = token_nll(model, mine, mine)
        # FSDP averages gradients over the processes: scaled by N they sum to the global mean's.
        (nll * world / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(nll.detach()) / n)
    return losses


def main(argv: list[str]) -> int:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lqmod.fsdp import ShardedQuantizedTensor, make_bases_shardable

    out, steps = argv[0], int(argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = build()
    make_bases_shardable(model)
    for layer in model.model.layers:  # type: ignore[union-attr]
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local = [p.to_local() for p in model.parameters() if hasattr(p, "to_local")]
    held = sum(t.numel() * t.element_size() for p in local if isinstance(p, ShardedQuantizedTensor) for t in p.parts)
    losses = train(model, steps, rank, world)
    total = torch.tensor([float(sum(losses))], dtype=torch.float64)
    dist.all_reduce(total)
    helds = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(helds, torch.tensor([held]))
    # The adapters are DTensors (FSDP shards them too): the whole of each, on every rank.
    adapters = {n: p.full_tensor().detach().contiguous()  # type: ignore[attr-defined]
                for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        save_file(adapters, out + ".safetensors")
        with open(out + ".json", "w") as fh:
            json.dump({"losses_sum": float(total), "held": [int(h) for h in helds]}, fh)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
